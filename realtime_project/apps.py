"""The admin app with this project's site (``realtime_project.admin.RealtimeAdminSite``)."""

from django.contrib.admin.apps import AdminConfig


class RealtimeAdminConfig(AdminConfig):
    default_site = "realtime_project.admin.RealtimeAdminSite"
