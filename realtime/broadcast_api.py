"""The REST broadcast endpoints (PROTOCOL.md 5.3): HTTP request -> ``group_send``.

``POST /realtime/v1/api/broadcast`` takes a batch of JSON messages;
``POST /realtime/v1/api/broadcast/<topic>/events/<event>`` sends one message
whose body is the payload, JSON or raw bytes. Both answer 202 with an empty
body once every accepted message is in the channel layer. A private message
needs broadcast write on its sub-topic as the request's claims, decided by
the ``realtime.messages`` policies (``realtime.channel_auth``, PROTOCOL.md 7).

Both are Django REST framework views (``realtime.rest.AsyncAPIView``):
authentication by ``realtime.rest_auth``, errors raised as ``APIError`` with
the reference's status and body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.request import Request
from rest_framework.response import Response

from shared import metrics
from realtime.channel_auth import headers_json, private_writes
from core.jwt import Claims
from realtime.limits import get_redis, rest_rate_exceeded
from realtime.protocol.serializer import is_json_payload
from realtime.publisher import get_publisher
from realtime.rest import APIError, AsyncAPIView, message
from realtime.rest_auth import SupabaseTokenUser
from core.topics import broadcast_group
from core.types import KIND_BINARY, KIND_JSON, BroadcastMessage

logger = logging.getLogger(__name__)


def _claims(request: Request) -> Claims:
    user = request.user
    assert isinstance(user, SupabaseTokenUser), "TokenForPost admits only authenticated POSTs"
    return user.claims


def _private_writes(request: Request, claims: Claims) -> Callable[[str], Awaitable[bool]]:
    return private_writes(claims, headers_json(request.headers.items()))


def _too_large() -> APIError:
    return message(413, f"Request body too large: at most {settings.REALTIME_MAX_REST_BODY_BYTES} bytes")


async def _check_rate(request: Request, claims: Claims, count: int) -> None:
    """Raise the reference's 429 if this caller (role, sub, client address) sent more than
    REALTIME_MAX_EVENTS_PER_SECOND.

    Not a DRF throttle: ``allow_request`` is synchronous and the counters are in Redis
    behind redis.asyncio (one pipelined round trip).
    """
    caller = f"{claims.role}\n{claims.sub or ''}\n{request.META.get('REMOTE_ADDR', '')}"
    try:
        exceeded = await rest_rate_exceeded(
            get_redis(), settings.REALTIME_REDIS_PREFIX, caller, count,
            settings.REALTIME_MAX_EVENTS_PER_SECOND, settings.REALTIME_RATE_WINDOW_S, time.time(),
        )
    except Exception:
        logger.warning("REST rate not counted: Redis unavailable", exc_info=True)
        return
    if exceeded:
        metrics.limit_hits.labels("rest_events_per_second").inc()
        raise message(429, "Too many requests")


def _max_payload_bytes() -> int:
    return int(settings.REALTIME_MAX_PAYLOAD_SIZE_KB) * 1000 + 500


async def _publish(message: BroadcastMessage) -> None:
    await get_publisher().publish(message)


def _message(sub_topic: str, private: bool, kind: str, event: str, encoding: int, payload: bytes) -> BroadcastMessage:
    return BroadcastMessage(
        type="realtime.broadcast",
        group=broadcast_group(sub_topic, private),
        topic=f"realtime:{sub_topic}",
        origin="",
        kind=kind,
        event=event,
        encoding=encoding,
        payload=payload,
    )


def _validate(item: Any) -> tuple[dict[str, list[str]], bytes | None]:
    """Check one batch message; return its field errors and its encoded broadcast payload."""
    if not isinstance(item, dict):
        return {"message": ["is invalid"]}, None
    errors: dict[str, list[str]] = {}
    for name in ("topic", "event"):
        value = item.get(name)
        if value is None or value == "":
            errors[name] = ["can't be blank"]
        elif not isinstance(value, str):
            errors[name] = ["is invalid"]
    payload = item.get("payload")
    if payload is None:
        errors["payload"] = ["can't be blank"]
    elif not isinstance(payload, dict):
        errors["payload"] = ["is invalid"]
    if "private" in item and not isinstance(item["private"], bool):
        errors["private"] = ["is invalid"]
    if errors:
        return errors, None
    body: dict[str, Any] = {"type": "broadcast", "event": item["event"], "payload": payload}
    if item.get("id") is not None:
        body["meta"] = {"id": item["id"]}
    encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(encoded) > _max_payload_bytes():
        return {"payload": ["Payload size exceeds tenant limit"]}, None
    return {}, encoded


class BroadcastBatchView(AsyncAPIView):
    """``POST /realtime/v1/api/broadcast`` with ``{"messages": [...]}``."""

    async def post(self, request: Request) -> Response:
        claims = _claims(request)
        await _check_rate(request, claims, 1)  # before the body is parsed; the rest of its messages below
        try:
            body = json.loads(request.body or b"null")
        except RequestDataTooBig:
            raise _too_large() from None
        except (ValueError, UnicodeDecodeError):
            raise APIError(422, {"errors": {"messages": ["is invalid"]}}) from None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise APIError(422, {"errors": {"messages": ["can't be blank"]}})
        if len(messages) > settings.REALTIME_MAX_BROADCAST_BATCH:
            metrics.limit_hits.labels("rest_batch_size").inc()
            raise message(429, "Too many messages to broadcast, please reduce the batch size")
        if len(messages) > 1:
            await _check_rate(request, claims, len(messages) - 1)
        checked = [_validate(item) for item in messages]
        if any(errors for errors, _ in checked):
            raise APIError(422, {"errors": {"messages": [errors for errors, _ in checked]}})
        may_write = _private_writes(request, claims)
        accepted: list[BroadcastMessage] = []
        for item, (_, encoded) in zip(messages, checked):
            assert encoded is not None
            private = bool(item.get("private", False))
            if private and not await may_write(item["topic"]):
                continue  # PROTOCOL.md 5.3: dropped silently, still 202
            accepted.append(_message(item["topic"], private, KIND_JSON, item["event"], 1, encoded))
        # Handed to the publisher together (in order), so messages to one topic travel as one batch
        # instead of one channel-layer send each.
        await asyncio.gather(*(_publish(broadcast) for broadcast in accepted))
        return Response(status=202)


class BroadcastSingleView(AsyncAPIView):
    """``POST /realtime/v1/api/broadcast/<topic>/events/<event>``: the body is the payload."""

    async def post(self, request: Request, topic: str, event: str) -> Response:
        claims = _claims(request)
        content_type = request.content_type or ""
        try:
            body = request.body
        except RequestDataTooBig:
            raise _too_large() from None
        await _check_rate(request, claims, 1)
        if content_type in ("", "application/json"):
            if not is_json_payload(body):  # what realtime-js can parse, not all json.loads takes
                raise APIError(422, {"errors": {"payload": ["is invalid"]}})
            encoding = 1
        elif content_type == "application/octet-stream":
            encoding = 0
        else:
            raise APIError(415, {"error": "Unsupported Media Type. Use application/json or application/octet-stream"})
        if len(body) > _max_payload_bytes():
            raise APIError(422, {"errors": {"payload": ["Payload size exceeds tenant limit"]}})
        private = request.query_params.get("private", "").strip().lower() == "true"
        if private and not await _private_writes(request, claims)(topic):
            raise message(403, "Unauthorized")
        await _publish(_message(topic, private, KIND_BINARY, event, encoding, body))
        return Response(status=202)


broadcast_batch = BroadcastBatchView.as_view()
broadcast_single = BroadcastSingleView.as_view()
