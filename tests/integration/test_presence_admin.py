"""The presence pages of the Django admin, read live from Redis."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings

from presence.store import RedisPresenceStore

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def member() -> tuple[str, str]:
    channel = f"public:admin-{uuid.uuid4().hex[:8]}"
    store = RedisPresenceStore(settings.REDIS_URL, "test-process", ttl=30)

    async def track() -> str:
        result = await store.track(channel, "ann", "socket-1", {"user": "ann"})
        await store.close()
        return result.entry.phx_ref

    return channel, async_to_sync(track)()


def test_anonymous_users_are_sent_to_the_login_page(client, member) -> None:
    response = client.get("/admin/presence/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_channel_list_shows_member_counts(admin_client, member) -> None:
    channel, _ = member
    response = admin_client.get("/admin/presence/")
    assert response.status_code == 200
    row = next(r for r in response.context["rows"] if r["channel"] == channel)
    assert row["members"] == 1


def test_channel_page_shows_metas_and_disconnect_removes_the_member(admin_client, member) -> None:
    channel, phx_ref = member
    page = admin_client.get(f"/admin/presence/{channel}/")
    assert page.status_code == 200
    [row] = page.context["rows"]
    assert (row["key"], row["meta"], row["process_id"]) == ("ann", {"user": "ann"}, "test-process")
    assert b"Disconnect" in page.content
    response = admin_client.post(f"/admin/presence/{channel}/", {"key": "ann", "phx_ref": phx_ref})
    assert response.status_code == 302
    assert admin_client.get(f"/admin/presence/{channel}/").context["rows"] == []
