"""HTTP routes: the REST broadcast API, a health check and the admin."""

from django.contrib import admin
from django.urls import path

from presence import admin as presence_admin
from realtime import admin_status, broadcast_api, health_api, views

urlpatterns = [
    path("healthz", views.healthz),
    path("metrics", views.prometheus_metrics),
    path("healthcheck", health_api.liveness),
    path("api/health", health_api.HealthView.as_view()),
    path("realtime/v1/api/broadcast", broadcast_api.broadcast_batch),
    path("api/broadcast", broadcast_api.broadcast_batch),
    path("realtime/v1/api/broadcast/<str:topic>/events/<str:event>", broadcast_api.broadcast_single),
    path("api/broadcast/<str:topic>/events/<str:event>", broadcast_api.broadcast_single),
    *presence_admin.urls(),
    path("admin/realtime/status/", admin.site.admin_view(admin_status.status_page), name="realtime-status"),
    path("admin/", admin.site.urls),
]
