"""The admin site: Django's, with Presence listed among the apps on its index and sidebar.

Presence has no model (its pages read Redis live, ``presence/admin.py``), so
Django would not list it; ``get_app_list`` adds it for the staff users who
may open those pages (every staff user, as ``admin_view`` checks).
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
        if app_label in (None, "presence") and request.user.is_active and request.user.is_staff:
            app_list.append(presence_app())
            app_list.sort(key=lambda app: str(app["name"]).lower())
        return app_list


def presence_app() -> dict[str, Any]:
    """The Presence entry in the shape of ``AdminSite._build_app_dict``'s apps."""
    url = reverse("presence-channels")
    return {
        "name": apps.get_app_config("presence").verbose_name,
        "app_label": "presence",
        "app_url": url,
        "has_module_perms": True,
        "models": [
            {
                "name": "Channels",
                "object_name": "Channel",
                "perms": {"add": False, "change": False, "delete": False, "view": True},
                "admin_url": url,
                "add_url": None,
                "view_only": True,
            }
        ],
    }
