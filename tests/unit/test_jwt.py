"""Token verification: each failure has the reference's code and message."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from core.jwt import KeySet, TokenError, load_jwks, mint_token, verify_token

pytestmark = pytest.mark.unit

SECRET = "test-secret-with-at-least-thirty-two-characters!"
NOW = 1_700_000_000.0


def sign(claims: dict, secret: str = SECRET, alg: str = "HS256", headers: dict | None = None) -> str:
    return pyjwt.encode(claims, secret, algorithm=alg, headers=headers)


def error_of(token: object) -> TokenError:
    with pytest.raises(TokenError) as caught:
        verify_token(token, SECRET, NOW)
    return caught.value


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_valid_hmac_token_gives_role_and_claims(alg: str) -> None:
    claims = verify_token(sign({"role": "authenticated", "exp": NOW + 60, "sub": "u1"}, alg=alg), SECRET, NOW)
    assert (claims.role, claims.sub, claims.exp) == ("authenticated", "u1", NOW + 60)


@pytest.mark.parametrize("token", ["potato", "", "a.b", "a.b.c", None, 42, "x.y.z.w"])
def test_malformed_tokens(token: object) -> None:
    error = error_of(token)
    assert (error.code, error.message) == ("MalformedJWT", "The token provided is not a valid JWT")


def test_claims_that_are_not_an_object_are_malformed() -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256"}).encode()).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(b"[1,2]").rstrip(b"=").decode()
    assert error_of(f"{header}.{body}.sig").code in {"MalformedJWT", "JwtSignatureError"}


def test_wrong_secret_is_a_signature_error() -> None:  # C4
    error = error_of(sign({"role": "anon", "exp": NOW + 60}, secret="another-secret-of-sufficient-length-123"))
    assert (error.code, error.message) == ("JwtSignatureError", "Failed to validate JWT signature")


def test_expired_token_says_how_long_ago() -> None:  # C3
    error = error_of(sign({"role": "anon", "exp": NOW - 42}))
    assert (error.code, error.message) == ("InvalidJWTToken", "Token has expired 42 seconds ago")
    assert error.handshake_message == "Token has expired"


@pytest.mark.parametrize("claims", [{"exp": NOW + 60}, {"role": "anon"}, {"role": "", "exp": NOW + 60}])
def test_role_and_exp_are_required(claims: dict) -> None:  # C3
    error = error_of(sign(claims))
    assert (error.code, error.message) == ("InvalidJWTToken", "Fields `role` and `exp` are required in JWT")


def test_asymmetric_algorithms_without_jwks_have_no_signer() -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "k1"}).encode()).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"role": "anon", "exp": NOW + 60}).encode()).rstrip(b"=").decode()
    error = error_of(f"{header}.{body}.c2ln")
    assert error.code == "JwtSignerError"
    assert error.message.startswith('Failed to generate JWT signer for key ID (kid) "k1"')


@pytest.mark.parametrize("alg", [["HS256"], {"name": "HS256"}, 256, None])
def test_an_alg_that_is_not_a_string_has_no_signer(alg: object) -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": alg}).encode()).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"role": "anon", "exp": NOW + 60}).encode()).rstrip(b"=").decode()
    assert error_of(f"{header}.{body}.c2ln").code == "JwtSignerError"


def test_minted_tokens_verify() -> None:
    token = mint_token(SECRET, "service_role", NOW, 60)
    assert verify_token(token, SECRET, NOW).role == "service_role"


def test_claim_validators_refuse_a_different_value() -> None:  # C8
    good = sign({"role": "anon", "exp": NOW + 60, "iss": "x"})
    bad = sign({"role": "anon", "exp": NOW + 60, "iss": "y"})
    assert verify_token(good, SECRET, NOW, {"iss": "x"}).role == "anon"
    with pytest.raises(TokenError) as caught:
        verify_token(bad, SECRET, NOW, {"iss": "x"})
    assert (caught.value.handshake_status, caught.value.handshake_message) == (500, "Error connecting to Realtime")


# --- JWKS (C7) ---------------------------------------------------------------


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
CLAIMS = {"role": "authenticated", "exp": NOW + 60, "sub": "u1"}


def public_jwk(algorithm: Any, key: Any, kid: str) -> dict[str, Any]:
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid}


def key_set() -> KeySet:
    algorithms = pyjwt.algorithms
    keys = [
        public_jwk(algorithms.RSAAlgorithm, RSA_KEY, "rsa-1"),
        public_jwk(algorithms.ECAlgorithm, EC_KEY, "ec-1"),
        public_jwk(algorithms.OKPAlgorithm, ED_KEY, "ed-1"),
        {"kty": "oct", "kid": "hmac-1", "k": base64.urlsafe_b64encode(b"k" * 40).rstrip(b"=").decode()},
    ]
    return load_jwks(json.dumps({"keys": keys}))


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [("RS256", RSA_KEY, "rsa-1"), ("RS512", RSA_KEY, "rsa-1"), ("PS256", RSA_KEY, "rsa-1"),
     ("ES256", EC_KEY, "ec-1"), ("EdDSA", ED_KEY, "ed-1")],
)
def test_asymmetric_tokens_verify_with_the_jwks_key_named_by_kid(alg: str, key: Any, kid: str) -> None:
    token = pyjwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": kid})
    assert verify_token(token, SECRET, NOW, jwks=key_set()).sub == "u1"


def test_an_unknown_kid_or_a_key_of_the_wrong_type_has_no_signer() -> None:
    for kid in ("nope", "ec-1"):  # ec-1 exists but cannot verify RS256
        token = pyjwt.encode(CLAIMS, RSA_KEY, algorithm="RS256", headers={"kid": kid})
        with pytest.raises(TokenError) as caught:
            verify_token(token, SECRET, NOW, jwks=key_set())
        assert caught.value.code == "JwtSignerError"
        assert caught.value.message == (
            f'Failed to generate JWT signer for key ID (kid) "{kid}", check your JWT secret or JWKS configuration'
        )


def test_a_jwks_token_signed_by_another_key_fails_the_signature() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = pyjwt.encode(CLAIMS, other, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(TokenError) as caught:
        verify_token(token, SECRET, NOW, jwks=key_set())
    assert caught.value.code == "JwtSignatureError"


def test_hmac_tokens_use_the_oct_key_of_their_kid_else_the_secret() -> None:
    by_kid = pyjwt.encode(CLAIMS, b"k" * 40, algorithm="HS256", headers={"kid": "hmac-1"})
    assert verify_token(by_kid, SECRET, NOW, jwks=key_set()).role == "authenticated"
    by_secret = pyjwt.encode(CLAIMS, SECRET, algorithm="HS256", headers={"kid": "not-in-the-set"})
    assert verify_token(by_secret, SECRET, NOW, jwks=key_set()).role == "authenticated"


@pytest.mark.parametrize("text", ["not json", "[]", '{"keys": {}}', '{"keys": [{"kty": "RSA"}]}',
                                  '{"keys": [{"kid": "x", "kty": "RSA", "n": "??"}]}'])
def test_a_bad_jwks_is_reported(text: str) -> None:
    with pytest.raises(ValueError):
        load_jwks(text)
