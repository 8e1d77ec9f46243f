"""The pure parts of ``shared.claimsets``: claim set identity and the registry's entry format."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from shared.claimsets import decode_claims, encode_claims, fingerprint
from core.jwt import Claims

pytestmark = pytest.mark.unit

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=8))
raw_claims = st.dictionaries(st.text(max_size=6), scalars, max_size=5)


def claims(raw: dict, role: str = "authenticated") -> Claims:
    sub = raw.get("sub")
    exp = raw.get("exp")
    return Claims(
        role=role, exp=float(exp) if isinstance(exp, int) and not isinstance(exp, bool) else float("inf"),
        sub=sub if isinstance(sub, str) else None, raw=raw,
    )


@given(raw_claims)
def test_a_claim_set_survives_the_registry(raw: dict) -> None:
    original = claims(raw)
    decoded = decode_claims(encode_claims(original))
    assert decoded.role == original.role and decoded.raw == raw and decoded.sub == original.sub
    assert fingerprint(decoded) == fingerprint(original)


@given(raw_claims, st.text(min_size=1, max_size=6), scalars)
def test_any_claim_that_differs_makes_another_claim_set(raw: dict, name: str, value: object) -> None:
    changed = {**raw, name: value}
    if changed != raw:
        assert fingerprint(claims(changed)) != fingerprint(claims(raw))


def test_identity_is_exact_iat_and_exp_included_and_key_order_ignored() -> None:
    base = {"sub": "u", "iat": 1, "exp": 2}
    assert fingerprint(claims(base)) == fingerprint(claims({"exp": 2, "iat": 1, "sub": "u"}))
    assert fingerprint(claims(base)) != fingerprint(claims({**base, "iat": 3}))
    assert fingerprint(claims(base)) != fingerprint(claims({**base, "exp": 4}))
    assert fingerprint(claims(base)) != fingerprint(claims(base, role="anon"))
