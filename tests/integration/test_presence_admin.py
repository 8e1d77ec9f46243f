"""The presence pages of the Django admin, read live from Redis, whatever names clients pick."""

from __future__ import annotations

import json
import uuid
from html import escape
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings

from presence.admin import channel_url
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


def test_admin_index_and_sidebar_list_presence(admin_client) -> None:
    index = admin_client.get("/admin/")
    assert index.status_code == 200
    [app] = [app for app in index.context["app_list"] if app["app_label"] == "presence"]
    assert (app["name"], app["app_url"], app["models"][0]["admin_url"]) == ("Presence", "/admin/presence/", "/admin/presence/")
    assert b'href="/admin/presence/"' in index.content
    # Django's own apps stay listed, in alphabetical order with Presence.
    names = [str(app["name"]) for app in index.context["app_list"]]
    assert "Authentication and Authorization" in names and names == sorted(names, key=str.lower)
    # The sidebar of every admin page lists it too.
    page = admin_client.get("/admin/presence/")
    assert any(app["app_label"] == "presence" for app in page.context["available_apps"])


def test_admin_index_shows_no_presence_to_anonymous_users(client) -> None:
    response = client.get("/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_metas_are_shown_as_json(admin_client) -> None:
    channel = f"public:admin-{uuid.uuid4().hex[:8]}"
    meta = {"user": "ann", "online": True, "away": None, "tags": ["a", "é"], "n": 1.5}
    store = RedisPresenceStore(settings.REDIS_URL, "test-process", ttl=30)

    async def track() -> None:
        await store.track(channel, "ann", "socket-1", meta)
        await store.close()

    async_to_sync(track)()
    html = admin_client.get(channel_url(channel)).content.decode()
    assert escape(json.dumps(meta, ensure_ascii=False)) in html
    assert "True" not in html and "None" not in html  # no Python repr


# --- names chosen by clients --------------------------------------------------------

HOSTILE_SUFFIXES = [
    "<script>alert(1)</script>",
    "a/b",
    "a/../../auth/user",  # reverse() would give a link a browser resolves to /admin/auth/user/
    "%2F",
    "*",
    "line\nbreak",
    "x" * 300,
    "\u202eevil",  # a bidi override
]


class Links(HTMLParser):
    """The href and text of every link in the page's table."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._in_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._in_table = True
        if tag == "a" and self._in_table:
            self._href = dict(attrs)["href"]
            self.links.append((self._href or "", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            href, text = self.links[-1]
            self.links[-1] = (href, text + data)


@pytest.fixture
def hostile_members() -> list[tuple[str, str, str]]:
    """(channel, key, phx_ref) for each hostile suffix, as channel and as key."""
    base = f"public:adm-{uuid.uuid4().hex[:8]}-"
    store = RedisPresenceStore(settings.REDIS_URL, "test-process", ttl=30)

    async def track() -> list[tuple[str, str, str]]:
        tracked = []
        for number, suffix in enumerate(HOSTILE_SUFFIXES):
            channel, key = base + suffix, f"key-{suffix}"
            result = await store.track(channel, key, f"socket-{number}", {"user": suffix})
            tracked.append((channel, key, result.entry.phx_ref))
        await store.close()
        return tracked

    return async_to_sync(track)()


def test_hostile_channel_names_are_listed_escaped_with_working_links(admin_client, hostile_members) -> None:
    page = admin_client.get("/admin/presence/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parser = Links()
    parser.feed(html)
    links = dict((text, href) for href, text in parser.links)
    for channel, key, _ in hostile_members:
        href = links[channel]  # the whole name, shown as text
        # What a browser does with the link: resolve dot segments against the page.
        assert urljoin("http://testserver/admin/presence/", href) == f"http://testserver{href}"
        detail = admin_client.get(href)
        assert detail.status_code == 200, (channel, href)
        assert detail.context["channel"] == channel
        assert [row["key"] for row in detail.context["rows"]] == [key]


def test_hostile_keys_are_shown_escaped_and_can_be_disconnected(admin_client, hostile_members) -> None:
    for channel, key, phx_ref in hostile_members:
        url = channel_url(channel)
        page = admin_client.get(url)
        html = page.content.decode()
        assert "<script>alert" not in html
        assert escape(key) in html
        # Only the phx_ref is posted: a browser would send a newline in a key back as CRLF.
        response = admin_client.post(url, {"phx_ref": phx_ref})
        assert (response.status_code, response["Location"]) == (302, url)
        assert admin_client.get(url).context["rows"] == []


def test_channel_url_keeps_ordinary_names_readable() -> None:
    assert channel_url("public:room-1") == "/admin/presence/public:room-1/"
    assert channel_url("public:a/b%2F?#\n") == "/admin/presence/public:a%2Fb%252F%3F%23%0A/"
