"""Token verification with this server's settings: ``JWT_SECRET``, ``JWT_JWKS``, ``JWT_CLAIM_VALIDATORS``."""

from __future__ import annotations

from django.conf import settings

from core.jwt import Claims, KeySet, load_jwks, verify_token


def configured_jwks() -> KeySet | None:
    text = settings.REALTIME_JWT_JWKS
    if not text:
        return None
    try:
        return load_jwks(text)
    except ValueError:
        return None  # reported by the realtime.E003 system check; only JWT_SECRET signs then


def verify(token: str, now: float) -> Claims:
    """Verify a connect, join, ``access_token`` or REST token.

    Raises:
        core.jwt.TokenError: with the reference's code and message.
    """
    return verify_token(token, settings.JWT_SECRET, now, settings.REALTIME_JWT_CLAIM_VALIDATORS, configured_jwks())
