"""The admin site: Django's, with Presence and Realtime (its status page) listed among the apps on its index and sidebar.

Neither has a model (their pages read Redis live, ``presence/admin.py`` and
``realtime/admin_status.py``), so Django would not list them; ``get_app_list``
adds them for the staff users who may open those pages (every staff user, as
``admin_view`` checks).
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse


class RealtimeAdminSite(admin.AdminSite):
    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[dict[str, Any]]:
        app_list: list[dict[str, Any]] = super().get_app_list(request, app_label)
        if request.user.is_active and request.user.is_staff:
            app_list.extend(app for app in (presence_app(), realtime_app()) if app_label in (None, app["app_label"]))
            app_list.sort(key=lambda app: str(app["name"]).lower())
        return app_list


def presence_app() -> dict[str, Any]:
    """The Presence entry in the shape of ``AdminSite._build_app_dict``'s apps."""
    return _page_app("presence", reverse("presence-channels"), "Channels", "Channel")


def realtime_app() -> dict[str, Any]:
    """The Realtime entry: its status page."""
    return _page_app("realtime", reverse("realtime-status"), "Status", "Status")


def _page_app(app_label: str, url: str, name: str, object_name: str) -> dict[str, Any]:
    """An app of one read-only page, in the shape of ``AdminSite._build_app_dict``'s apps."""
    return {
        "name": apps.get_app_config(app_label).verbose_name,
        "app_label": app_label,
        "app_url": url,
        "has_module_perms": True,
        "models": [
            {
                "name": name,
                "object_name": object_name,
                "perms": {"add": False, "change": False, "delete": False, "view": True},
                "admin_url": url,
                "add_url": None,
                "view_only": True,
            }
        ],
    }
