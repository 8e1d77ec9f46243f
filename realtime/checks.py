"""System checks for combinations of realtime settings (tag ``realtime``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from core.jwt import load_jwks


@checks.register("realtime")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    if len(settings.JWT_SECRET) < 32:
        messages.append(
            checks.Warning(
                "JWT_SECRET is shorter than 32 characters.",
                hint="Use the project's JWT secret; short HMAC secrets can be brute-forced.",
                id="realtime.W001",
            )
        )
    if settings.REALTIME_CHANNEL_ERROR_BACKOFF_MS >= 10_000:
        messages.append(
            checks.Error(
                "REALTIME_CHANNEL_ERROR_BACKOFF_MS must be below the clients' 10 s join timeout.",
                hint="The reference default is 5000.",
                id="realtime.E001",
            )
        )
    if settings.REALTIME_MAX_CHANNELS_PER_CLIENT < 1:
        messages.append(checks.Error("REALTIME_MAX_CHANNELS_PER_CLIENT must be at least 1.", id="realtime.E002"))
    if settings.REALTIME_CHECK_TIMEOUT_MS < 1:
        messages.append(
            checks.Error(
                "REALTIME_CHECK_TIMEOUT_MS must be at least 1.",
                hint="0 would let one slow row level security policy stop every table's changes; the default is 5000.",
                id="realtime.E004",
            )
        )
    if settings.REALTIME_JWT_JWKS:
        try:
            load_jwks(settings.REALTIME_JWT_JWKS)
        except ValueError as error:
            messages.append(checks.Error(str(error), hint="Use the JWKS of the project's signing keys.", id="realtime.E003"))
    return messages
