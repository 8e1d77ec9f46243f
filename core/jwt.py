"""Verify Supabase access tokens: token text in, ``Claims`` or a coded error out.

Pure: the caller passes the secret and the current time. The checks and their
messages follow the reference server (PROTOCOL.md 1.2); the handshake uses
shorter texts for some of them (PROTOCOL.md 1.3), given by ``handshake_message``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt as pyjwt

from core.errors import RealtimeError

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Asymmetric algorithms and the JWKS key type (kty) each needs.
KEY_TYPES = {
    **{f"{family}{bits}": "RSA" for family in ("RS", "PS") for bits in (256, 384, 512)},
    **{f"ES{bits}": "EC" for bits in (256, 384, 512)},
    "EdDSA": "OKP",
}


@dataclass(frozen=True, slots=True)
class KeySet:
    """A JWKS (``{"keys": [...]}``): each key by its ``kid``, as (kty, key usable by PyJWT)."""

    keys: dict[str, tuple[str, Any]]

    def find(self, kid: Any, kty: str) -> Any:
        """The key with ``kid`` of type ``kty``, or None."""
        found = self.keys.get(kid) if isinstance(kid, str) else None
        return found[1] if found is not None and found[0] == kty else None


@functools.lru_cache(maxsize=8)
def load_jwks(text: str) -> KeySet:
    """Parse a JWKS document (the ``JWT_JWKS`` setting).

    Raises:
        ValueError: not a JWKS, or a key PyJWT cannot use.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"JWT_JWKS is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('JWT_JWKS must be a JSON object {"keys": [...]}')
    keys: dict[str, tuple[str, Any]] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            raise ValueError("every JWT_JWKS key needs a string kid")
        try:
            keys[entry["kid"]] = (str(entry.get("kty")), pyjwt.PyJWK(entry).key)
        except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError) as error:
            raise ValueError(f"JWT_JWKS key {entry['kid']!r} cannot be used: {error}") from None
    return KeySet(keys)


class TokenError(RealtimeError):
    """A token that cannot be used; ``code`` is the reference's PascalCase code."""

    def __init__(self, code: str, message: str, handshake_message: str | None = None, handshake_status: int = 401) -> None:
        super().__init__(code, message)
        self.handshake_message = handshake_message or message
        self.handshake_status = handshake_status


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants: the Postgres role and the raw claims."""

    role: str
    exp: float
    sub: str | None
    raw: dict[str, Any]


def _malformed() -> TokenError:
    return TokenError("MalformedJWT", "The token provided is not a valid JWT")


def verify_token(
    token: Any, secret: str, now: float, validators: dict[str, Any] | None = None, jwks: KeySet | None = None
) -> Claims:
    """Verify a token signed with ``secret`` (HS256/384/512) or a key of ``jwks`` named by its ``kid``.

    HMAC tokens use the ``oct`` key matching their ``kid`` if ``jwks`` has
    one, else ``secret``; RS*, PS*, ES* and EdDSA tokens need a ``kid``
    matching a key of the right type (PROTOCOL.md 1.2).

    Raises:
        TokenError: with the reference's code and message for each failure.
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise _malformed()
    try:
        header = pyjwt.get_unverified_header(token)
    except (pyjwt.DecodeError, ValueError, TypeError):
        raise _malformed() from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        alg = ""  # a list or an object in "alg" names no algorithm (and would not hash below)
    kid = header.get("kid")
    key: Any = None
    if alg in HMAC_ALGORITHMS:
        key = (jwks.find(kid, "oct") if jwks is not None else None) or secret
    elif alg in KEY_TYPES and jwks is not None:
        key = jwks.find(kid, KEY_TYPES[alg])
    if key is None:
        message = "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
        if isinstance(kid, str):
            message = (
                f'Failed to generate JWT signer for key ID (kid) "{kid}", '
                "check your JWT secret or JWKS configuration"
            )
        raise TokenError("JwtSignerError", message)
    try:
        raw = pyjwt.decode(
            token,
            key,
            algorithms=[alg],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except pyjwt.InvalidSignatureError:
        raise TokenError("JwtSignatureError", "Failed to validate JWT signature") from None
    except (pyjwt.InvalidTokenError, ValueError, TypeError, json.JSONDecodeError):
        raise _malformed() from None
    if not isinstance(raw, dict):
        raise _malformed()
    return check_claims(raw, now, validators)


def check_claims(raw: dict[str, Any], now: float, validators: dict[str, Any] | None = None) -> Claims:
    """Apply the claim rules of PROTOCOL.md 1.2 steps 4-5 to verified claims."""
    exp = raw.get("exp")
    if "exp" in raw:
        if not _is_number(exp):
            raise TokenError("InvalidJWTToken", "Token expiration time is invalid", "Token has expired")
        if exp <= now:
            ago = math.floor(now - exp)
            raise TokenError("InvalidJWTToken", f"Token has expired {ago} seconds ago", "Token has expired")
    if "iat" in raw and not _is_number(raw.get("iat")):
        raise TokenError("InvalidJWTToken", "Token issued-at time is invalid")
    for name, expected in (validators or {}).items():
        if raw.get(name) != expected:
            # The reference reports claim mismatches as a generic connect error.
            raise TokenError(
                "InvalidJWTToken", f"Invalid value for JWT claim \"{name}\"", "Error connecting to Realtime", 500
            )
    role = raw.get("role")
    if not isinstance(role, str) or not role or exp is None:
        raise TokenError("InvalidJWTToken", "Fields `role` and `exp` are required in JWT")
    sub = raw.get("sub")
    return Claims(role=role, exp=float(exp), sub=sub if isinstance(sub, str) else None, raw=raw)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def opaque_key_claims(token: str, secret_keys: Iterable[str], publishable_keys: Iterable[str] = ()) -> Claims | None:
    """The claims a configured opaque project key stands for (PROTOCOL.md 1.2), or None."""
    if token in secret_keys:
        return Claims(role="service_role", exp=math.inf, sub=None, raw={"role": "service_role"})
    if token in publishable_keys:
        return Claims(role="anon", exp=math.inf, sub=None, raw={"role": "anon"})
    return None


def mint_token(secret: str, role: str, now: float, expires_in: int, **claims: Any) -> str:
    """Sign an HS256 token for ``role`` (used by ``manage.py mint_token`` and tests)."""
    payload: dict[str, Any] = {"iss": "supabase", "role": role, "iat": int(now), "exp": int(now) + expires_in}
    payload.update(claims)
    return pyjwt.encode(payload, secret, algorithm="HS256")
