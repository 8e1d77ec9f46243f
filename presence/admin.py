"""Django admin pages for presence, read live from Redis (no database copy).

``/admin/presence/`` lists channels with member counts; a channel page lists
each key's metas (as JSON, the form clients send) with join time and owning
server process, and a staff user can disconnect a member, which removes it,
sends its leave to the channel and has its server process close the member's
socket (1000; a client may reconnect).
The views go through ``admin.site.admin_view``, so Django's login and staff
check protect them.

Channel names and presence keys are chosen by anonymous clients: templates
autoescape them (inside ``<bdi>``, so a bidi override cannot reorder the rest
of the row), and a channel's page is addressed by ``channel_url``, which
percent-encodes every ``/`` of the name: the name is one path segment, so
``..`` or ``.`` inside it never makes a browser resolve the link to another
page, and newlines, ``%``, ``?`` and ``#`` round-trip. A disconnect posts only
the ``phx_ref``; the key is read back from the store, since browsers turn
newlines in form values into CRLF.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import quote

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, register_converter, reverse
from django.utils.text import Truncator
from django.views.decorators.http import require_http_methods

from core.topics import process_group
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


class ChannelConverter:
    """Any non-empty text, newlines included (``path`` stops at a newline)."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ChannelConverter, "presence_channel")

# RFC 3986 sub-delims, ":" and "@": what a path segment may hold unescaped.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


def channel_url(channel: str) -> str:
    """The address of a channel's page, with the whole name as one path segment.

    ``reverse()`` keeps ``/`` as is, so ``public:a/../../auth/user`` would
    become a link that a browser resolves to ``/admin/auth/user/``; here
    ``/`` is ``%2F`` like every other byte outside a segment, and the server
    decodes it back before the route sees the name.
    """
    return f"{reverse('presence-channels')}{quote(channel, safe=_SEGMENT_SAFE)}/"


# Longest channel name or key shown whole; longer ones end in an ellipsis
# (their links and forms still carry the whole name).
LABEL_CHARS = 1024


def _label(name: str) -> str:
    return str(Truncator(name).chars(LABEL_CHARS))


def channel_list(request: HttpRequest) -> HttpResponse:
    channels = sorted(_run(lambda store: store.channels()))
    rows = [
        {"channel": name, "label": _label(name), "members": count, "url": channel_url(name)}
        for name, count in channels
    ]
    return TemplateResponse(
        request, "presence/channel_list.html", _context(request, title="Presence", rows=rows)
    )


async def _close_socket(process_id: str, socket_id: str) -> None:
    """Ask the member's server process to close its socket (``realtime.disconnect`` to its group)."""
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(process_group(process_id), {"type": "realtime.disconnect", "socket_id": socket_id})


@require_http_methods(["GET", "POST"])
def channel_detail(request: HttpRequest, channel: str) -> HttpResponse:
    if request.method == "POST":
        phx_ref = request.POST.get("phx_ref", "")

        async def disconnect(store: RedisPresenceStore) -> str | None:
            """The key of the removed meta, or None if it was gone."""
            entry = next((e for e in await store.list(channel) if e.phx_ref == phx_ref), None)
            diff = None if entry is None else await store.remove(channel, entry.key, phx_ref)
            if entry is None or diff is None:
                return None
            from realtime.presence import publish_diff

            await publish_diff(channel, diff)
            await _close_socket(entry.process_id, entry.socket_id)
            return entry.key

        key = _run(disconnect)
        if key is not None:
            messages.success(request, f"Disconnected {_label(key)} from {_label(channel)}.")
        else:
            messages.warning(request, f"That member was no longer in {_label(channel)}.")
        return HttpResponseRedirect(channel_url(channel))
    entries = _run(lambda store: store.list(channel))
    rows = [
        {
            "key": entry.key,
            "label": _label(entry.key),
            "phx_ref": entry.phx_ref,
            "meta": (meta := {k: v for k, v in entry.meta.items() if k != "phx_ref"}),
            "meta_json": json.dumps(meta, ensure_ascii=False),
            "joined_at": datetime.fromtimestamp(entry.joined_at, tz=timezone.utc),
            "process_id": entry.process_id,
            "socket_id": entry.socket_id,
        }
        for entry in sorted(entries, key=lambda e: (e.key, e.joined_at))
    ]
    return TemplateResponse(
        request,
        "presence/channel_detail.html",
        _context(request, title=f"Presence: {_label(channel)}", channel=channel, label=_label(channel), rows=rows),
    )


def urls() -> list[URLPattern]:
    """Mount before ``admin.site.urls`` (see realtime_project/urls.py)."""
    return [
        path("admin/presence/", admin.site.admin_view(channel_list), name="presence-channels"),
        path(
            "admin/presence/<presence_channel:channel>/",
            admin.site.admin_view(channel_detail),
            name="presence-channel",
        ),
    ]

