"""DRF authentication of the REST endpoints: simplejwt's classes around ``core.jwt``'s verification.

A request is authenticated by ``Authorization: Bearer <token>``, else by the
``apikey`` header (PROTOCOL.md 5.3). The token is verified exactly as at
connect and join (``realtime.tokens.verify``, PROTOCOL.md 1.2) or is one of
the configured opaque ``REALTIME_SECRET_KEYS`` (service_role).

What comes from ``rest_framework_simplejwt``: the authentication flow of
``JWTStatelessUserAuthentication`` (raw token -> ``get_validated_token`` over
``SIMPLE_JWT["AUTH_TOKEN_CLASSES"]`` -> a stateless ``TokenUser``; a bad token
is its ``InvalidToken``, a 401 with ``WWW-Authenticate``), its ``Token``
wrapper and ``TokenUser``.

What stays with PyJWT in ``core.jwt``, because simplejwt's ``TokenBackend``
cannot express the reference's verification:

- one ``ALGORITHM`` per backend, where the reference takes HS256/384/512 with
  the secret and RS/PS/ES/EdDSA (and kid-named ``oct`` keys) from the JWKS,
  chosen by the token's ``alg`` and ``kid``;
- JWKS only fetched from ``JWK_URL``, where ``JWT_JWKS`` is the document itself;
- PyJWT's default claim checks (a future ``iat`` or ``nbf`` refuses the token)
  where the reference ignores both, and no way to require ``role`` and ``exp``
  or to apply ``JWT_CLAIM_VALIDATORS`` (simplejwt checks only ``aud``/``iss``);
- ``Token.check_exp`` converts ``exp`` to a datetime, which overflows (a 500)
  on very large values the reference accepts;
- opaque ``sb_secret_...`` keys are not JWTs at all.

Header parsing is ours too: simplejwt matches ``AUTH_HEADER_TYPES`` case
sensitively, refuses ``Bearer`` without a token instead of falling back to
``apikey``, and reads one header only.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTStatelessUserAuthentication
from rest_framework_simplejwt.exceptions import TokenError as SimpleJWTTokenError
from rest_framework_simplejwt.models import TokenUser
from rest_framework_simplejwt.tokens import Token

from realtime import tokens
from core.jwt import Claims, TokenError, opaque_key_claims

logger = logging.getLogger(__name__)


class SupabaseAccessToken(Token):
    """A token verified as sockets verify theirs; ``claims`` is what it grants.

    Raises:
        rest_framework_simplejwt.exceptions.TokenError: the token cannot be used
            (the reference's reason as its message).
    """

    token_type = "access"
    lifetime = timedelta(0)  # simplejwt requires one; this server never mints REST tokens

    def __init__(self, token: Any = None, verify: bool = True) -> None:
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        if not isinstance(text, str):
            raise SimpleJWTTokenError("The token provided is not a valid JWT")
        claims = opaque_key_claims(text, settings.REALTIME_SECRET_KEYS)
        if claims is None:
            try:
                claims = tokens.verify(text, time.time())
            except TokenError as error:
                logger.info("REST request refused: %s", error.reason)
                raise SimpleJWTTokenError(error.reason) from None
        self.token = token
        self.claims: Claims = claims
        self.payload = claims.raw

    def verify(self) -> None:
        """Nothing to add: ``core.jwt`` checked signature and claims."""


class SupabaseTokenUser(TokenUser):
    """The caller: a Postgres role and claims, no Django user row."""

    @property
    def claims(self) -> Claims:
        token = self.token
        assert isinstance(token, SupabaseAccessToken)
        return token.claims

    def __str__(self) -> str:
        return f"{self.claims.role} {self.claims.sub or ''}".strip()


class SupabaseJWTAuthentication(JWTStatelessUserAuthentication):
    """``Authorization: Bearer <token>`` (any case), else ``apikey: <token>``."""

    def authenticate(self, request: Request) -> tuple[SupabaseTokenUser, SupabaseAccessToken] | None:
        raw = self.raw_token(request)
        if not raw:
            return None
        token = self.get_validated_token(raw)
        assert isinstance(token, SupabaseAccessToken), "SIMPLE_JWT AUTH_TOKEN_CLASSES must be SupabaseAccessToken"
        return SupabaseTokenUser(token), token

    @staticmethod
    def raw_token(request: Request) -> bytes:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = token or request.META.get("HTTP_APIKEY", "").strip()
        return token.encode("latin-1")
