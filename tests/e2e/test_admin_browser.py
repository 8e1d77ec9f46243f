"""The admin in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium.

A staff user logs in through the admin's login form, opens Presence, sees the
member that a real WebSocket client tracked, sees the server process with
that socket on the Realtime status page, then presses Disconnect: the client
receives its own leave and its socket is closed (1000). One browser for the whole test. Screenshots
go to ``artifacts/admin-browser/`` at the repository root (CI keeps
``artifacts/``).

``python3 dev.py test`` installs the two packages when they are missing; if
they are still missing here the test fails (it never skips).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

from tests.fixtures.phoenix import PhoenixClient, is_text
from tests.fixtures.server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "admin-browser"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)
WAIT_S = 10.0

T = TypeVar("T")


@pytest.fixture
def staff_login(django_user_model) -> tuple[str, str]:
    """A staff user in the test database (committed: the server process reads it)."""
    password = secrets.token_urlsafe(16)
    django_user_model.objects.create_user("operator", password=password, is_staff=True)
    return "operator", password


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A server process on the test database (its sessions and users), on the suite's Redis."""
    parts = urlsplit(os.environ["DATABASE_URL"])
    database_url = urlunsplit(parts._replace(path="/" + settings.DATABASES["default"]["NAME"]))
    process = ServerProcess(env={"DATABASE_URL": database_url}).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: `python3 dev.py test` installs them "
            "(apt-get install chromium chromium-driver); see its output for why it could not"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="realtime-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def run(call: Callable[..., T], *args: Any) -> T:
    """A blocking selenium call off the event loop, so the WebSocket client keeps reading meanwhile."""
    return await asyncio.to_thread(call, *args)


async def test_a_staff_user_disconnects_a_live_member_and_reads_the_status_page(
    server: ServerProcess, staff_login: tuple[str, str], browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = f"admin-browser-{uuid.uuid4().hex[:8]}"
    until = WebDriverWait(browser, WAIT_S).until

    async def screenshot(step: str) -> None:
        assert await run(browser.save_screenshot, str(ARTIFACTS / f"{step}.png")), f"no screenshot of {step}"

    # A real WebSocket client tracks presence on a public topic.
    client = await PhoenixClient.open(server, "ann")
    try:
        topic = f"realtime:{name}"
        await client.join_topic(topic, {"broadcast": {"self": False}, "presence": {"enabled": True, "key": "ann"}})
        ref = await client.push(topic, "presence", {"type": "presence", "event": "track", "payload": {"user": "ann"}})
        await client.wait_for(lambda f: is_text(f, "phx_reply") and f[1] == ref and f[4]["status"] == "ok", "track reply")
        await client.wait_for(
            lambda f: is_text(f, "presence_diff") and "ann" in f[4]["joins"], "its own join", WAIT_S
        )

        # Log in through the admin's form.
        username, password = staff_login
        await run(browser.get, f"{server.url}/admin/login/?next=/admin/")
        await run(browser.find_element(By.ID, "id_username").send_keys, username)
        await run(browser.find_element(By.ID, "id_password").send_keys, password)
        await run(browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click)
        await run(until, seen.presence_of_element_located((By.ID, "user-tools")))
        assert await run(browser.find_elements, By.CSS_SELECTOR, '#content-main a[href="/admin/presence/"]')
        assert await run(browser.find_elements, By.CSS_SELECTOR, '#content-main a[href="/admin/realtime/status/"]')
        # The admin's own CSS is served (ServeStatic): the header has its colour, not the browser default.
        header = await run(browser.find_element, By.ID, "header")
        assert await run(header.value_of_css_property, "background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
        await screenshot("1-index")

        # Presence: the channel, then its member.
        await run(browser.find_element(By.CSS_SELECTOR, '#content-main a[href="/admin/presence/"]').click)
        link = await run(until, seen.presence_of_element_located((By.PARTIAL_LINK_TEXT, name)))
        await screenshot("2-presence")
        await run(link.click)
        row = await run(until, seen.presence_of_element_located((By.XPATH, "//tr[td/bdi[text()='ann']]")))
        assert '{"user": "ann"}' in await run(lambda: row.text)
        await screenshot("3-member")
        member_page = await run(lambda: browser.current_url)

        # The status page: this server process, with the client's socket.
        assert server.process is not None
        column = f":{server.process.pid}"
        deadline = time.monotonic() + WAIT_S
        while True:
            await run(browser.get, f"{server.url}/admin/realtime/status/")
            headers = [await run(lambda e=e: e.text) for e in await run(browser.find_elements, By.CSS_SELECTOR, "#server-processes thead th")]
            if any(text.endswith(column) for text in headers) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await screenshot("4-status")
        index = next((i for i, text in enumerate(headers) if text.endswith(column)), None)
        assert index is not None, f"no column for the server process (pid {server.process.pid}) among {headers}"
        sockets_row = await run(browser.find_element, By.CSS_SELECTOR, '#server-processes tr[data-key="realtime_sockets"]')
        cells = [await run(lambda c=c: c.text) for c in await run(sockets_row.find_elements, By.CSS_SELECTOR, "th, td")]
        assert int(cells[index].replace(",", "")) >= 1, f"sockets row: {cells}"
        presence_row = await run(
            browser.find_element, By.CSS_SELECTOR, '#server-processes tr[data-key="realtime_channels{extension=\\"presence\\"}"]'
        )
        presence_cells = [await run(lambda c=c: c.text) for c in await run(presence_row.find_elements, By.CSS_SELECTOR, "th, td")]
        assert int(presence_cells[index]) >= 1, f"presence channels row: {presence_cells}"
        assert await run(browser.find_elements, By.CSS_SELECTOR, "#replicator caption")

        # Disconnect: the member is removed, the client receives its own leave and its socket is closed.
        await run(browser.get, member_page)
        row = await run(until, seen.presence_of_element_located((By.XPATH, "//tr[td/bdi[text()='ann']]")))
        await run(row.find_element(By.CSS_SELECTOR, "input[value=Disconnect]").click)
        message = await run(until, seen.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist li.success")))
        assert "Disconnected ann" in await run(lambda: message.text)
        assert not await run(browser.find_elements, By.XPATH, "//tr[td/bdi[text()='ann']]")
        await client.wait_for(
            lambda f: is_text(f, "presence_diff") and f[0] is None and "ann" in f[4]["leaves"], "its own leave", WAIT_S
        )
        await asyncio.wait_for(asyncio.shield(client.closed()), WAIT_S)
        assert client.ws.close_code == 1000, f"closed with {client.ws.close_code}"
        await screenshot("5-disconnected")

    finally:
        await client.close()
