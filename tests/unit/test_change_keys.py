"""The primary key a change carries for the RLS lookup: the text pgoutput printed (issue #10).

``shared.visibility`` reads each value back with ``jsonb_to_record``, that
is through the key type's input function; JSON forms that are not input
syntax (bytea's bare hex digits) would never match the row.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.test_changes import decode

pytestmark = pytest.mark.unit


def test_a_bytea_key_is_carried_as_its_input_syntax_not_its_json_hex() -> None:
    changes, batch = decode("insert_all_types", keys={"all_types": ("id", "c_bytea")}, rls=True)
    [run] = batch.runs
    first = run["changes"][0]
    assert changes[0]["record"]["c_bytea"] == "0102030405"  # the JSON value subscribers get (PROTOCOL.md 4.5)
    assert json.loads(first["key"]) == {"id": "1", "c_bytea": "\\x0102030405"}  # what bytea's input reads back


def test_runs_name_the_tables_primary_key() -> None:
    _, batch = decode("insert_all_types", keys={"all_types": ("id", "c_bytea")})
    assert batch.runs[0]["primary_key"] == ["id", "c_bytea"]
    _, batch = decode("no_pk", keys={"no_pk": ()})
    assert "primary_key" not in batch.runs[0]
