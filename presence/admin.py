"""Django admin pages for presence, read live from Redis (no database copy).

``/admin/presence/`` lists channels with member counts; a channel page lists
each key's metas with join time and owning server process, and a staff user
can disconnect a member, which removes it and sends its leave to the channel.
The views go through ``admin.site.admin_view``, so Django's login and staff
check protect them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_http_methods

from presence.store import RedisPresenceStore

T = TypeVar("T")


def _run(operation: Callable[[RedisPresenceStore], Awaitable[T]]) -> T:
    """Run one store operation with a short-lived store (this process tracks nobody)."""

    async def runner() -> T:
        store = RedisPresenceStore(settings.REDIS_URL, f"admin-{uuid.uuid4().hex}", ttl=settings.REALTIME_PRESENCE_TTL_S)
        try:
            return await operation(store)
        finally:
            await store.close()

    return async_to_sync(runner)()


def _context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {**admin.site.each_context(request), **extra}


def channel_list(request: HttpRequest) -> HttpResponse:
    channels = sorted(_run(lambda store: store.channels()))
    rows = [{"channel": name, "members": count} for name, count in channels]
    return TemplateResponse(
        request, "presence/channel_list.html", _context(request, title="Presence", rows=rows)
    )


@require_http_methods(["GET", "POST"])
def channel_detail(request: HttpRequest, channel: str) -> HttpResponse:
    if request.method == "POST":
        key, phx_ref = request.POST.get("key", ""), request.POST.get("phx_ref", "")

        async def disconnect(store: RedisPresenceStore) -> bool:
            diff = await store.remove(channel, key, phx_ref)
            if diff is None:
                return False
            from realtime.presence import publish_diff

            await publish_diff(channel, diff)
            return True

        if _run(disconnect):
            messages.success(request, f"Disconnected {key} from {channel}.")
        else:
            messages.warning(request, f"{key} was no longer in {channel}.")
        return HttpResponseRedirect(reverse("presence-channel", args=[channel]))
    entries = _run(lambda store: store.list(channel))
    rows = [
        {
            "key": entry.key,
            "phx_ref": entry.phx_ref,
            "meta": {k: v for k, v in entry.meta.items() if k != "phx_ref"},
            "joined_at": datetime.fromtimestamp(entry.joined_at, tz=timezone.utc),
            "process_id": entry.process_id,
            "socket_id": entry.socket_id,
        }
        for entry in sorted(entries, key=lambda e: (e.key, e.joined_at))
    ]
    return TemplateResponse(
        request,
        "presence/channel_detail.html",
        _context(request, title=f"Presence: {channel}", channel=channel, rows=rows),
    )


def urls() -> list[URLPattern]:
    """Mount before ``admin.site.urls`` (see realtime_project/urls.py)."""
    return [
        path("admin/presence/", admin.site.admin_view(channel_list), name="presence-channels"),
        path("admin/presence/<path:channel>/", admin.site.admin_view(channel_detail), name="presence-channel"),
    ]

