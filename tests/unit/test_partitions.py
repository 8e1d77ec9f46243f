"""Tests for shared.partitions' pure part: the plan for a clock reading, names, and the statements."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.partitions import (
    Plan,
    _State,
    _steps,
    day_start,
    parse_partition_name,
    partition_name,
    plan,
)

pytestmark = pytest.mark.unit

D = date(2026, 3, 10)


def names(*offsets: int) -> list[str]:
    return [partition_name(D + timedelta(days=offset)) for offset in offsets]


def days(*offsets: int) -> tuple[date, ...]:
    return tuple(D + timedelta(days=offset) for offset in offsets)


def at(hour: int, minute: int = 0, offset: int = 0) -> datetime:
    return datetime.combine(D + timedelta(days=offset), datetime.min.time()).replace(hour=hour, minute=minute)


@pytest.mark.parametrize(
    ("now", "existing", "create", "drop"),
    [
        (at(12), [], days(-1, 0, 1, 2, 3), ()),
        (at(12), names(-1, 0, 1, 2, 3), (), ()),
        (at(12), names(0, 2), days(-1, 1, 3), ()),
        # D-3 still holds rows younger than 72 h at any time of day D: kept; D-4 is all older.
        (at(0), names(-5, -4, -3, -2), days(-1, 0, 1, 2, 3), days(-5, -4)),
        (at(23, 59), names(-4, -3), days(-1, 0, 1, 2, 3), days(-4)),
        # Days beyond the window are left alone, not dropped.
        (at(12), names(7), days(-1, 0, 1, 2, 3), ()),
    ],
)
def test_plan_creates_yesterday_to_three_days_ahead_and_drops_days_all_older_than_72h(
    now: datetime, existing: list[str], create: tuple[date, ...], drop: tuple[date, ...]
) -> None:
    todo = plan(now, existing)
    assert (todo.create, todo.drop) == (create, drop)


def test_the_cutoff_is_the_start_of_the_day_72_hours_ago() -> None:
    assert plan(at(12), []).cutoff == day_start(D - timedelta(days=3))
    assert plan(at(0), []).cutoff == day_start(D - timedelta(days=3))


def test_five_days_later_the_first_days_go_and_the_new_ones_come() -> None:
    first = plan(at(10), [])
    existing = [partition_name(day) for day in first.create]
    later = plan(at(10, offset=5), existing)
    assert later.create == days(4, 5, 6, 7, 8)
    assert later.drop == days(-1, 0, 1)  # D+2 and D+3 still hold rows younger than 72 h at D+5 10:00


def test_plan_ignores_partitions_that_are_not_daily() -> None:
    existing = ["messages_default", "messages_2026_13_01", "messages_2026_03_1", "other_2026_03_01", *names(-9)]
    assert plan(at(12), existing).drop == days(-9)


def test_plan_crosses_a_year() -> None:
    assert plan(datetime(2026, 12, 31, 8), []).create == (
        date(2026, 12, 30), date(2026, 12, 31), date(2027, 1, 1), date(2027, 1, 2), date(2027, 1, 3),
    )


def test_an_aware_clock_is_read_in_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    # 02:00 in Tokyo on D is 17:00 UTC on D-1.
    assert plan(datetime.combine(D, datetime.min.time(), tokyo).replace(hour=2), []).create == days(-2, -1, 0, 1, 2)
    assert plan(at(12).replace(tzinfo=UTC), []) == plan(at(12), [])


@pytest.mark.parametrize(
    ("name", "day"),
    [
        ("messages_2026_03_10", D),
        ("messages_2024_02_29", date(2024, 2, 29)),
        ("messages_2026_02_29", None),
        ("messages_default", None),
        ("messages_2026_03_10_old", None),
        ("x_messages_2026_03_10", None),
    ],
)
def test_parse_partition_name(name: str, day: date | None) -> None:
    assert parse_partition_name(name) == day


@given(st.dates(min_value=date(1000, 1, 1), max_value=date(9999, 12, 31)))
def test_partition_names_round_trip(day: date) -> None:
    assert parse_partition_name(partition_name(day)) == day


def test_create_moves_the_days_rows_out_of_the_default_partition_before_attaching() -> None:
    state = _State(at(12), (), ("realtime", "messages_default"), ("topic", "id", "inserted_at"))
    create, purge = _steps(Plan(create=(D,), drop=(), cutoff=day_start(D)), state)
    text = [statement.as_string(None) for statement in create.statements]
    assert text[1] == (
        'CREATE TABLE "realtime"."messages_2026_03_10" (LIKE "realtime"."messages" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'
    )
    assert text[2].startswith('WITH moved AS (DELETE FROM "realtime"."messages_default" WHERE inserted_at >= ')
    assert 'INSERT INTO "realtime"."messages_2026_03_10" ("topic", "id", "inserted_at")' in text[2]
    assert text[3] == (
        'ALTER TABLE "realtime"."messages" ATTACH PARTITION "realtime"."messages_2026_03_10" FOR VALUES FROM'
        " ('2026-03-10 00:00:00'::timestamp) TO ('2026-03-11 00:00:00'::timestamp)"
    )
    assert (create.kind, create.counted, purge.kind, purge.counted) == ("create", 2, "purge", 1)
    assert purge.statements[1].as_string(None) == (
        "DELETE FROM \"realtime\".\"messages_default\" WHERE inserted_at < '2026-03-10 00:00:00'::timestamp"
    )


def test_without_a_default_partition_nothing_is_moved_or_purged() -> None:
    state = _State(at(12), (), None, ("topic",))
    steps = _steps(Plan(create=(D,), drop=(D - timedelta(days=9),), cutoff=day_start(D)), state)
    assert [(step.kind, step.name, step.counted) for step in steps] == [
        ("create", "messages_2026_03_10", None),
        ("drop", "messages_2026_03_01", None),
    ]
    assert steps[1].statements[1].as_string(None) == 'DROP TABLE IF EXISTS "realtime"."messages_2026_03_01"'
