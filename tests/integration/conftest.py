"""Fixtures for in-process tests of the ASGI application against the real Redis layer."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from psycopg import sql

from realtime.dbsetup import SETUP_SQL
from tests.fixtures.server import mint_token
from realtime.runtime import close_runtime


def dsn() -> str:
    """The database the in-process application uses."""
    return os.environ["DATABASE_URL"]


def execute(*statements: sql.Composable | str, params: Any = None) -> None:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement, params)


@pytest.fixture
def publication(settings) -> Any:
    """A publication of this test's own, so replicators of other tests never see its tables."""
    name = f"test_pub_{uuid.uuid4().hex[:10]}"
    execute(SETUP_SQL, sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(name)))
    settings.REALTIME_PUBLICATION = name
    yield name
    execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def realtime_schema() -> None:
    """The database prepared as ``manage.py migrate`` does: API roles, ``auth`` functions, ``realtime.messages``."""
    execute(SETUP_SQL)


@pytest.fixture
def policy(realtime_schema: None) -> Iterator[Callable[[str], None]]:
    """``policy("FOR SELECT TO authenticated USING (...)")`` on ``realtime.messages``; dropped after the test."""
    names: list[str] = []

    def create(body: str) -> None:
        name = f"test_{uuid.uuid4().hex[:12]}"
        names.append(name)
        execute(sql.SQL("CREATE POLICY {} ON realtime.messages ").format(sql.Identifier(name)) + sql.SQL(body))

    yield create
    for name in names:
        execute(sql.SQL("DROP POLICY IF EXISTS {} ON realtime.messages").format(sql.Identifier(name)))


def sql_literal(value: str) -> str:
    """``value`` quoted as an SQL string literal, for policy text in tests."""
    return sql.Literal(value).as_string(None)


def token(role: str = "anon", exp_in: float = 3600, **claims: Any) -> str:
    return mint_token(role, exp_in=exp_in, **claims)  # type: ignore[arg-type]  # a float exp_in works too


class Client:
    """A WebsocketCommunicator that speaks Phoenix frames."""

    def __init__(self, communicator: WebsocketCommunicator, vsn: str) -> None:
        self.ws = communicator
        self.vsn = vsn

    async def push(self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any) -> None:
        if self.vsn == "2.0.0":
            await self.ws.send_to(text_data=json.dumps([join_ref, ref, topic, event, payload]))
        else:
            frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
            if join_ref is not None:
                frame["join_ref"] = join_ref
            await self.ws.send_to(text_data=json.dumps(frame))

    async def recv(self, timeout: float = 2) -> Any:
        message = await self.ws.receive_output(timeout)
        assert message["type"] == "websocket.send", message
        if message.get("bytes") is not None:
            return message["bytes"]
        return json.loads(message["text"])

    async def recv_event(self, event: str, timeout: float = 2) -> Any:
        """Skip frames until one with ``event`` arrives."""
        while True:
            frame = await self.recv(timeout)
            if isinstance(frame, bytes):
                continue
            name = frame[3] if isinstance(frame, list) else frame["event"]
            if name == event:
                return frame

    async def nothing(self, timeout: float = 0.3) -> bool:
        return await self.ws.receive_nothing(timeout)

    async def join(self, topic: str, config: dict[str, Any] | None = None, ref: str = "1", **extra: Any) -> Any:
        await self.push(ref, ref, topic, "phx_join", {"config": config or {}, **extra})
        return await self.recv()


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """``await connect(vsn=..., apikey=...)`` -> a connected Client; all closed afterwards."""
    from realtime_project.asgi import application

    opened: list[WebsocketCommunicator] = []

    async def _connect(vsn: str = "2.0.0", apikey: str | None = None, headers: list[tuple[bytes, bytes]] | None = None, expect: bool = True) -> Any:
        query = {"apikey": apikey if apikey is not None else token(), "vsn": vsn}
        communicator = WebsocketCommunicator(application, f"/realtime/v1/websocket?{urlencode(query)}", headers=headers)
        opened.append(communicator)
        connected, _ = await communicator.connect(timeout=5)
        assert connected is expect
        return Client(communicator, vsn)

    yield _connect
    for communicator in opened:
        await communicator.disconnect()
    await close_runtime()
    layer = get_channel_layer()
    if layer is not None and hasattr(layer, "close_pools"):
        await layer.close_pools()
    # The layer keeps per-event-loop receive state; each test has its own loop.
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
