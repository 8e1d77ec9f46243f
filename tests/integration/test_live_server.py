"""A real server process over real sockets.

Covers what only a real server shows: handshake refusals with their HTTP
status and body (PROTOCOL.md 1.3), the REST endpoints (5.3) and a misbehaving
client that must not disturb a well-behaved one. The handshake tests, one
broadcast round trip and the admin's static files run under every server the
README offers (``any_server``: daphne, uvicorn ``--ws websockets`` and
``websockets-sansio``); the rest under daphne.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fixtures.server import ServerProcess, mint_token, start_server
from tests.integration.conftest import sql_literal

pytestmark = pytest.mark.integration

WAIT = 5.0


def ws_url(server: ServerProcess, vsn: str | None = "2.0.0", apikey: str | None = None) -> str:
    query: dict[str, str] = {}
    if apikey is not None:
        query["apikey"] = apikey
    if vsn is not None:
        query["vsn"] = vsn
    return f"{server.ws_url}?{urlencode(query)}"


async def refused(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=headers, open_timeout=WAIT):
            pass
    response = caught.value.response
    body = bytes(response.body or b"")
    return response.status_code, json.loads(body) if body else None


# Fields an HTTP/1.1 parser must refuse to see twice (RFC 9112 section 6.3); Node's does.
SINGLE_FIELDS = ("content-length", "transfer-encoding")
# uvicorn's websockets-sansio before 0.52.1 writes its own Content-Type ahead of the
# application's (uvicorn issue #3040, fixed by PR #3041); Node keeps the first one.
SANSIO_CONTENT_TYPE_FIXED = tuple(int(part) for part in version("uvicorn").split(".")[:3]) >= (0, 52, 1)


def refusal_content_types(server: ServerProcess) -> list[str]:
    """The Content-Type field lines each server sends with a refusal."""
    if server.server == "uvicorn-sansio" and not SANSIO_CONTENT_TYPE_FIXED:
        return ["text/plain; charset=utf-8", "application/json"]
    return ["application/json"]


async def raw_refusal(server: ServerProcess, apikey: str | None, vsn: str = "2.0.0") -> tuple[int, dict[str, list[str]], bytes]:
    """The answer to an upgrade request read as a strict HTTP/1.1 client reads it.

    Fails on a repeated Content-Length or Transfer-Encoding (Node's parser answers
    "Parse Error: Duplicate Content-Length", and supabase-js sees no status) and on
    a body shorter or longer than its Content-Length.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        target = ws_url(server, vsn=vsn, apikey=apikey).removeprefix(f"ws://127.0.0.1:{server.port}")
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: Upgrade\r\n"
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        for name in SINGLE_FIELDS:
            assert len(headers.get(name, [])) <= 1, f"{name} sent {len(headers[name])} times: {head!r}"
        assert "content-length" in headers, f"no content-length: {head!r}"
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"][0])), WAIT)
        rest = await asyncio.wait_for(reader.read(), WAIT)  # the server closes the connection
        assert rest == b"", f"bytes after the body: {rest!r}"
        return int(status_line.split(" ")[1]), headers, body
    finally:
        writer.close()


async def joined(server: ServerProcess, room: str, config: dict[str, Any] | None = None, role: str = "anon", vsn: str = "2.0.0") -> ClientConnection:
    ws = await connect(ws_url(server, vsn=vsn, apikey=mint_token(role)), open_timeout=WAIT)
    if vsn == "2.0.0":
        await ws.send(json.dumps(["1", "1", room, "phx_join", {"config": config or {}}]))
        reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert reply[4]["status"] == "ok", reply
    else:
        await ws.send(json.dumps({"topic": room, "event": "phx_join", "payload": {"config": config or {}}, "ref": "1", "join_ref": "1"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert reply["payload"]["status"] == "ok", reply
    return ws


async def quiet(ws: ClientConnection, seconds: float = 0.5) -> bool:
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return True
    raise AssertionError(f"unexpected frame {frame!r}")


def post(server: ServerProcess, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{server.url}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def room() -> str:
    return f"realtime:live-{uuid.uuid4().hex[:8]}"


# --- handshake ------------------------------------------------------------


# Every server the README offers runs these (``any_server``).


async def test_valid_key_upgrades(any_server: ServerProcess) -> None:  # C1
    token = mint_token("anon", exp_in=1234)  # a token of this test's own
    async with connect(ws_url(any_server, apikey=token), open_timeout=WAIT) as ws:
        await ws.send(json.dumps([None, "1", "phoenix", "heartbeat", {}]))
        assert json.loads(await ws.recv()) == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
    # No server writes the token of a connect URL to its log (uvicorn's access log prints query strings).
    log = any_server.log_text()
    assert "websocket" in log.lower() or any_server.server == "daphne", "no access line to check"
    assert token.split(".")[1] not in log, "the apikey was written to the server's log"


async def test_socket_path_is_served_too(any_server: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{any_server.port}/socket/websocket?{urlencode({'apikey': mint_token('anon'), 'vsn': '2.0.0'})}"
    async with connect(url, open_timeout=WAIT):
        pass


@pytest.mark.parametrize(
    ("apikey", "status", "error"),
    [
        (None, 401, "API key is missing"),  # C2
        ("potato", 401, "The token provided is not a valid JWT"),  # C4
        ("expired", 401, "Token has expired"),  # C3
        ("no-role", 401, "Fields `role` and `exp` are required in JWT"),  # C3
        ("wrong-secret", 401, "Failed to validate JWT signature"),  # C4
    ],
)
async def test_handshake_refusals_have_status_and_body(any_server: ServerProcess, apikey: str | None, status: int, error: str) -> None:
    """Read by a strict HTTP/1.1 reader (one Content-Length, the body of that length) and by the websockets client."""
    import jwt

    keys = {
        "expired": lambda: mint_token("anon", exp_in=-60),
        "no-role": lambda: mint_token(None),
        "wrong-secret": lambda: jwt.encode({"role": "anon", "exp": 4102444800}, "x" * 40, algorithm="HS256"),
    }
    key = keys[apikey]() if apikey in keys else apikey
    got_status, headers, body = await raw_refusal(any_server, key)
    assert (got_status, json.loads(body)) == (status, {"error": error})
    assert headers["content-type"] == refusal_content_types(any_server), headers
    assert await refused(ws_url(any_server, apikey=key)) == (status, {"error": error})


async def test_x_api_key_header_wins_over_invalid_apikey(any_server: ServerProcess) -> None:  # C5
    async with connect(ws_url(any_server, apikey="potato"), additional_headers={"x-api-key": mint_token("anon")}, open_timeout=WAIT):
        pass


async def test_unknown_vsn_is_not_upgraded(any_server: ServerProcess) -> None:  # C6
    status, _, _ = await raw_refusal(any_server, mint_token("anon"), vsn="3.0.0")
    assert status == 403


# --- REST -----------------------------------------------------------------


def bearer(role: str = "service_role") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(role)}", "Content-Type": "application/json"}


async def test_rest_batch_reaches_subscribers(realtime_server: ServerProcess) -> None:  # C73
    topic = room()
    ws = await joined(realtime_server, topic)
    messages = [
        {"topic": topic.removeprefix("realtime:"), "event": "e1", "payload": {"n": 1}},
        {"topic": topic.removeprefix("realtime:"), "event": "e2", "payload": {"n": 2}, "id": "m-2"},
    ]
    status, body = post(realtime_server, "/realtime/v1/api/broadcast", json.dumps({"messages": messages}).encode(), bearer())
    assert (status, body) == (202, b"")
    first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    second = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert first == [None, None, topic, "broadcast", {"type": "broadcast", "event": "e1", "payload": {"n": 1}}]
    assert second[4] == {"type": "broadcast", "event": "e2", "payload": {"n": 2}, "meta": {"id": "m-2"}}
    await ws.close()


async def test_rest_batch_refusals(realtime_server: ServerProcess) -> None:  # C74
    body = json.dumps({"messages": [{"topic": "a", "event": "e", "payload": {}}]}).encode()
    assert post(realtime_server, "/realtime/v1/api/broadcast", body, {"Content-Type": "application/json"}) == (401, b'{"message": "Unauthorized"}')
    status, raw = post(
        realtime_server,
        "/realtime/v1/api/broadcast",
        json.dumps({"messages": [{"topic": "a", "event": "e", "payload": {}}, {"topic": "a", "event": "e"}]}).encode(),
        bearer(),
    )
    assert status == 422
    assert json.loads(raw) == {"errors": {"messages": [{}, {"payload": ["can't be blank"]}]}}


def batch_for(sub: str, event: str) -> bytes:
    return json.dumps({"messages": [{"topic": sub, "event": event, "payload": {}}]}).encode()


async def test_rest_tokens_are_verified_as_the_handshake_verifies_them(realtime_server: ServerProcess) -> None:  # C74
    import jwt

    topic = room()
    sub = topic.removeprefix("realtime:")
    ws = await joined(realtime_server, topic)
    accepted = {
        "lower-case bearer": {"authorization": f"bearer {mint_token('service_role')}"},
        "apikey header": {"apikey": mint_token("anon")},
        "empty bearer, apikey header": {"Authorization": "Bearer ", "apikey": mint_token("anon")},
    }
    for label, headers in accepted.items():
        assert post(realtime_server, "/realtime/v1/api/broadcast", batch_for(sub, label), headers) == (202, b""), label
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))[4]["event"] == label
    refused_tokens = {
        "expired": mint_token("anon", exp_in=-60),
        "no role": mint_token(None),
        "another secret": jwt.encode({"role": "anon", "exp": 4102444800}, "x" * 40, algorithm="HS256"),
        "not a JWT": "potato",
    }
    for label, token in refused_tokens.items():
        status, body = post(realtime_server, "/realtime/v1/api/broadcast", batch_for(sub, label), {"Authorization": f"Bearer {token}"})
        assert (status, json.loads(body)) == (401, {"message": "Unauthorized"}), label
    assert await quiet(ws)
    await ws.close()


async def test_rest_preflight_and_other_methods_need_no_token(realtime_server: ServerProcess) -> None:
    for method, expected in (("OPTIONS", 204), ("GET", 405)):
        request = urllib.request.Request(f"{realtime_server.url}/realtime/v1/api/broadcast", method=method, headers={"Authorization": "Bearer potato"})
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                status, headers, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, body = error.code, error.headers, error.read()
        assert status == expected, method
        assert headers["Access-Control-Allow-Origin"] == "*"
        if expected == 405:
            assert json.loads(body) == {"message": "Method not allowed"}


async def test_rest_batch_private_without_write_is_accepted_and_dropped(realtime_server: ServerProcess, policy) -> None:  # C75
    topic = room()
    sub = topic.removeprefix("realtime:")
    ws = await joined(realtime_server, topic, {"private": True}, role="service_role")
    message = {"topic": sub, "event": "e", "payload": {}, "private": True}
    status, _ = post(realtime_server, "/realtime/v1/api/broadcast", json.dumps({"messages": [message]}).encode(), bearer("anon"))
    assert status == 202
    assert await quiet(ws)
    policy(f"FOR INSERT TO anon WITH CHECK (realtime.topic() = {sql_literal(sub)} AND extension = 'broadcast')")
    status, _ = post(realtime_server, "/realtime/v1/api/broadcast", json.dumps({"messages": [message]}).encode(), bearer("anon"))
    assert status == 202
    assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))[4]["event"] == "e"
    await ws.close()


async def test_rest_single_message(realtime_server: ServerProcess) -> None:  # C76
    topic = room()
    sub = topic.removeprefix("realtime:")
    v2 = await joined(realtime_server, topic)
    v1 = await joined(realtime_server, topic, vsn="1.0.0")
    path = f"/realtime/v1/api/broadcast/{sub}/events/ping"
    assert post(realtime_server, path, b'{"a":1}', bearer()) == (202, b"")
    assert await asyncio.wait_for(v2.recv(), WAIT) == bytes([4, len(topic), 4, 0, 1]) + topic.encode() + b"ping" + b'{"a":1}'
    assert json.loads(await asyncio.wait_for(v1.recv(), WAIT))["payload"] == {"type": "broadcast", "event": "ping", "payload": {"a": 1}}
    status, raw = post(realtime_server, path, b"hi", {**bearer(), "Content-Type": "text/plain"})
    assert status == 415 and json.loads(raw)["error"].startswith("Unsupported Media Type")
    await v2.close()
    await v1.close()


async def test_rest_single_private_message_needs_write(realtime_server: ServerProcess, policy) -> None:  # C76
    topic = room()
    sub = topic.removeprefix("realtime:")
    ws = await joined(realtime_server, topic, {"private": True}, role="service_role")
    path = f"/realtime/v1/api/broadcast/{sub}/events/ping?private=true"
    status, raw = post(realtime_server, path, b"{}", bearer("anon"))
    assert (status, json.loads(raw)) == (403, {"message": "Unauthorized"})
    assert await quiet(ws)
    policy(f"FOR INSERT TO anon WITH CHECK (realtime.topic() = {sql_literal(sub)})")
    assert post(realtime_server, path, b'{"a":1}', bearer("anon")) == (202, b"")
    assert await asyncio.wait_for(ws.recv(), WAIT) == bytes([4, len(topic), 4, 0, 1]) + topic.encode() + b"ping" + b'{"a":1}'
    await ws.close()


# --- robustness -----------------------------------------------------------


async def test_bad_input_never_disturbs_a_well_behaved_client(realtime_server: ServerProcess) -> None:
    topic = room()
    sender = await joined(realtime_server, topic)
    receiver = await joined(realtime_server, topic)
    received = 0

    async def tick(n: int) -> None:
        nonlocal received
        await sender.send(json.dumps(["1", str(100 + n), topic, "broadcast", {"type": "broadcast", "event": "t", "payload": {"n": n}}]))
        frame = json.loads(await asyncio.wait_for(receiver.recv(), WAIT))
        assert frame[4]["payload"] == {"n": n}
        received += 1

    bad = await connect(ws_url(realtime_server, apikey=mint_token("anon")), open_timeout=WAIT, max_size=None)
    inputs: list[str | bytes] = [
        "{not json",
        json.dumps({"topic": 1, "event": [], "payload": "x"}),
        json.dumps([None, "1", "realtime:x", "no_such_event", {}]),
        json.dumps(["1", "1", "not-realtime", "phx_join", {}]),
        json.dumps(["1", "1", topic, "phx_join", {"config": {"broadcast": "yes", "postgres_changes": 7}}]),
        b"\x03\x05\x05\x05",
        b"",
    ]
    for n, frame in enumerate(inputs):
        await bad.send(frame)
        await tick(n)
    # A burst of joins: past the join rate that socket alone is closed with 1001 (test_hostile.py has the details).
    with pytest.raises(ConnectionClosed) as burst_closed:
        for i in range(1000):
            await bad.send(json.dumps([str(i), str(i), f"realtime:burst-{i}", "phx_join", {"config": {}}]))
        while True:
            await asyncio.wait_for(bad.recv(), WAIT)
    assert burst_closed.value.rcvd is not None and burst_closed.value.rcvd.code == 1001
    await tick(50)
    bad = await connect(ws_url(realtime_server, apikey=mint_token("anon")), open_timeout=WAIT, max_size=None)
    await bad.send("x" * 5_000_001)  # over the frame limit: that socket alone is closed with 1009
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(bad.recv(), WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    await tick(99)
    assert received == len(inputs) + 2
    await sender.close()
    await receiver.close()


# --- every server the README offers ------------------------------------------


async def test_every_server_serves_the_same_protocol(any_server: ServerProcess) -> None:
    topic = room()
    a = await joined(any_server, topic)
    b = await joined(any_server, topic)
    await a.send(json.dumps(["1", "2", topic, "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]))
    assert json.loads(await asyncio.wait_for(b.recv(), WAIT))[3] == "broadcast"
    await a.close()
    await b.close()


async def test_every_server_serves_the_admin_static_files(any_server: ServerProcess) -> None:
    def get(path: str) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(f"{any_server.url}{path}", timeout=WAIT) as response:
            return response.status, response.headers["Content-Type"], response.read()

    status, content_type, body = await asyncio.to_thread(get, "/static/admin/css/base.css")
    assert (status, content_type.split(";")[0]) == (200, "text/css")
    assert b"--body-bg" in body  # Django's admin stylesheet, not an error page
    status, content_type, _ = await asyncio.to_thread(get, "/static/admin/js/core.js")
    assert (status, content_type.split(";")[0]) == (200, "text/javascript")
    with pytest.raises(urllib.error.HTTPError) as missing:
        await asyncio.to_thread(get, "/static/admin/css/no-such-file.css")
    assert missing.value.code == 404
    missing.value.close()


def sockets_per_process(metrics_dir: Path) -> dict[str, float]:
    """``realtime_sockets`` of each server process, read from its file in the multiprocess directory."""
    from prometheus_client.multiprocess import MultiProcessCollector

    counts: dict[str, float] = {}
    for path in metrics_dir.glob("gauge_livesum_*.db"):  # one file per process, named by its pid
        for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
            for sample in metric.samples:
                if sample.name == "realtime_sockets":
                    counts[path.stem.rpartition("_")[2]] = sample.value
    return counts


@pytest.mark.timeout(90)
async def test_uvicorn_workers_share_one_port_with_fan_out_and_metrics_intact(tmp_path: Path) -> None:
    """``uvicorn --workers 2`` as the README runs it: sockets on both workers, one broadcast reaches all, /metrics sums them."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    topic = room()
    sockets: list[ClientConnection] = []
    with start_server(env=env, server="uvicorn", extra_args=["--workers", "2"]) as server:
        try:
            # The workers accept from one listening socket: a burst of connects reaches both.
            while len(sockets) < 400:
                sockets += await asyncio.gather(*(joined(server, topic) for _ in range(50)))
                if sum(1 for count in sockets_per_process(tmp_path).values() if count > 0) == 2:
                    break
            per_process = sockets_per_process(tmp_path)
            assert sorted(per_process.values())[0] > 0, f"one worker holds every socket: {per_process}"
            assert sum(per_process.values()) == len(sockets)
            await sockets[0].send(json.dumps(["1", "2", topic, "broadcast", {"type": "broadcast", "event": "all", "payload": {}}]))
            for ws in sockets[1:]:
                assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))[4]["event"] == "all"
            with urllib.request.urlopen(f"{server.url}/metrics", timeout=WAIT) as response:
                exposition = response.read().decode()
            assert f"realtime_sockets {float(len(sockets))}" in exposition.splitlines()
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))


async def test_jwks_signed_tokens_upgrade_and_an_unknown_kid_is_refused() -> None:  # C7
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwks = json.dumps({"keys": [{**public_jwk, "kid": "project-key-1", "use": "sig"}]})
    claims = {"role": "authenticated", "exp": 4102444800, "sub": "u1"}
    good = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": "project-key-1"})
    unknown = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": "rotated-away"})
    with start_server(env={"JWT_JWKS": jwks}) as server:
        async with connect(ws_url(server, apikey=good), open_timeout=WAIT) as ws:
            await ws.send(json.dumps(["1", "1", room(), "phx_join", {"config": {}, "access_token": good}]))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))[4]["status"] == "ok"
        assert await refused(ws_url(server, apikey=unknown)) == (401, {"error": (
            'Failed to generate JWT signer for key ID (kid) "rotated-away", check your JWT secret or JWKS configuration'
        )})
        # HS256 with the JWT secret keeps working next to the JWKS.
        async with connect(ws_url(server, apikey=mint_token("anon")), open_timeout=WAIT):
            pass
        # REST verifies tokens the same way.
        assert post(server, "/realtime/v1/api/broadcast", batch_for("jwks", "e"), {"Authorization": f"Bearer {good}"}) == (202, b"")
        status, body = post(server, "/realtime/v1/api/broadcast", batch_for("jwks", "e"), {"Authorization": f"Bearer {unknown}"})
        assert (status, json.loads(body)) == (401, {"message": "Unauthorized"})
