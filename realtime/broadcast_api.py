"""The REST broadcast endpoints (PROTOCOL.md 5.3): HTTP request -> ``group_send``.

``POST /realtime/v1/api/broadcast`` takes a batch of JSON messages;
``POST /realtime/v1/api/broadcast/<topic>/events/<event>`` sends one message
whose body is the payload, JSON or raw bytes. Both answer 202 with an empty
body once every accepted message is in the channel layer. A private message
needs broadcast write on its sub-topic as the request's claims, decided by
the ``realtime.messages`` policies (``realtime.channel_auth``, PROTOCOL.md 7).
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
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from realtime.channel_auth import headers_json, private_writes
from realtime.jwt import Claims, TokenError, opaque_key_claims
from realtime.limits import get_redis, rest_rate_exceeded
from realtime.protocol.serializer import is_json_payload
from realtime.publisher import get_publisher
from realtime.tokens import verify
from realtime.topics import broadcast_group
from realtime.types import KIND_BINARY, KIND_JSON, BroadcastMessage

logger = logging.getLogger(__name__)

View = Callable[..., Awaitable[HttpResponse]]

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, apikey, x-client-info, content-type, x-api-key",
    "Access-Control-Max-Age": "86400",
}


def _with_cors(view: View) -> View:
    async def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "OPTIONS":
            response: HttpResponse = HttpResponse(status=204)
        elif request.method != "POST":
            response = JsonResponse({"message": "Method not allowed"}, status=405)
        else:
            response = await view(request, *args, **kwargs)
        for name, value in CORS_HEADERS.items():
            response[name] = value
        return response

    wrapped.__name__ = view.__name__
    wrapped.__doc__ = view.__doc__
    exempt: Callable[..., Awaitable[Any]] = csrf_exempt(wrapped)
    return exempt


def _authenticate(request: HttpRequest) -> Claims | None:
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    token = token or request.headers.get("apikey", "").strip()
    if not token:
        return None
    claims = opaque_key_claims(token, settings.REALTIME_SECRET_KEYS)
    if claims is not None:
        return claims
    try:
        return verify(token, time.time())
    except TokenError as error:
        logger.info("REST broadcast refused: %s", error.reason)
        return None


def _unauthorized() -> JsonResponse:
    return JsonResponse({"message": "Unauthorized"}, status=401)


def _private_writes(request: HttpRequest, claims: Claims) -> Callable[[str], Awaitable[bool]]:
    return private_writes(claims, headers_json(request.headers.items()))


def _too_many(message: str) -> JsonResponse:
    """PROTOCOL.md 5.3: 429 with the reference's message."""
    return JsonResponse({"message": message}, status=429)


def _too_large() -> JsonResponse:
    return JsonResponse(
        {"message": f"Request body too large: at most {settings.REALTIME_MAX_REST_BODY_BYTES} bytes"}, status=413
    )


async def _over_rate(request: HttpRequest, claims: Claims, count: int) -> bool:
    """Whether this caller (role, sub, client address) sent more than REALTIME_MAX_EVENTS_PER_SECOND."""
    caller = f"{claims.role}\n{claims.sub or ''}\n{request.META.get('REMOTE_ADDR', '')}"
    try:
        return await rest_rate_exceeded(
            get_redis(), settings.REALTIME_REDIS_PREFIX, caller, count,
            settings.REALTIME_MAX_EVENTS_PER_SECOND, settings.REALTIME_RATE_WINDOW_S, time.time(),
        )
    except Exception:
        logger.warning("REST rate not counted: Redis unavailable", exc_info=True)
        return False


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


@_with_cors
async def broadcast_batch(request: HttpRequest) -> HttpResponse:
    """``POST /realtime/v1/api/broadcast`` with ``{"messages": [...]}``."""
    claims = _authenticate(request)
    if claims is None:
        return _unauthorized()
    if await _over_rate(request, claims, 1):  # before the body is parsed; the rest of its messages below
        return _too_many("Too many requests")
    try:
        body = json.loads(request.body or b"null")
    except RequestDataTooBig:
        return _too_large()
    except (ValueError, UnicodeDecodeError):
        return JsonResponse({"errors": {"messages": ["is invalid"]}}, status=422)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return JsonResponse({"errors": {"messages": ["can't be blank"]}}, status=422)
    if len(messages) > settings.REALTIME_MAX_BROADCAST_BATCH:
        return _too_many("Too many messages to broadcast, please reduce the batch size")
    if len(messages) > 1 and await _over_rate(request, claims, len(messages) - 1):
        return _too_many("Too many requests")
    checked = [_validate(item) for item in messages]
    if any(errors for errors, _ in checked):
        return JsonResponse({"errors": {"messages": [errors for errors, _ in checked]}}, status=422)
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
    await asyncio.gather(*(_publish(message) for message in accepted))
    return HttpResponse(status=202)


@_with_cors
async def broadcast_single(request: HttpRequest, topic: str, event: str) -> HttpResponse:
    """``POST /realtime/v1/api/broadcast/<topic>/events/<event>``: the body is the payload."""
    claims = _authenticate(request)
    if claims is None:
        return _unauthorized()
    content_type = request.content_type or ""
    try:
        body = request.body
    except RequestDataTooBig:
        return _too_large()
    if await _over_rate(request, claims, 1):
        return _too_many("Too many requests")
    if content_type in ("", "application/json"):
        if not is_json_payload(body):  # what realtime-js can parse, not all json.loads takes
            return JsonResponse({"errors": {"payload": ["is invalid"]}}, status=422)
        encoding = 1
    elif content_type == "application/octet-stream":
        encoding = 0
    else:
        return JsonResponse(
            {"error": "Unsupported Media Type. Use application/json or application/octet-stream"}, status=415
        )
    if len(body) > _max_payload_bytes():
        return JsonResponse({"errors": {"payload": ["Payload size exceeds tenant limit"]}}, status=422)
    private = request.GET.get("private", "").strip().lower() == "true"
    if private and not await _private_writes(request, claims)(topic):
        return JsonResponse({"message": "Unauthorized"}, status=403)
    await _publish(_message(topic, private, KIND_BINARY, event, encoding, body))
    return HttpResponse(status=202)
