"""The graceful stop's pure parts: the drain's batches and the supervisor's child command and restart delays."""

from __future__ import annotations

import sys

import pytest

from realtime.runtime import DRAIN_MIN_BATCH, DRAIN_STEP_S, drain_schedule
from realtime.supervisor import RESTART_MAX_S, child_command, restart_delay

pytestmark = pytest.mark.unit


def test_no_sockets_no_batches() -> None:
    assert drain_schedule(0, 5.0) == []


def test_a_process_with_few_sockets_closes_them_all_at_once() -> None:
    assert drain_schedule(DRAIN_MIN_BATCH, 5.0) == [(0.0, DRAIN_MIN_BATCH)]
    assert drain_schedule(3, 5.0) == [(0.0, 3)]


def test_many_sockets_are_spread_evenly_over_the_whole_drain() -> None:
    schedule = drain_schedule(100_000, 5.0)
    assert sum(size for _, size in schedule) == 100_000
    offsets = [offset for offset, _ in schedule]
    assert offsets[0] == 0.0 and offsets[-1] <= 5.0
    assert offsets[-1] >= 5.0 - DRAIN_STEP_S  # the whole drain time is used
    assert all(b - a == pytest.approx(DRAIN_STEP_S) for a, b in zip(offsets, offsets[1:]))
    sizes = {size for _, size in schedule[:-1]}
    assert len(sizes) == 1 and schedule[-1][1] <= sizes.pop()


def test_a_middling_count_goes_in_minimum_batches_well_within_the_drain() -> None:
    schedule = drain_schedule(1_000, 5.0)
    assert [size for _, size in schedule] == [DRAIN_MIN_BATCH] * (1_000 // DRAIN_MIN_BATCH)
    assert schedule[-1][0] == pytest.approx((1_000 // DRAIN_MIN_BATCH - 1) * DRAIN_STEP_S)


def test_a_zero_drain_closes_everything_in_one_batch() -> None:
    assert drain_schedule(10_000, 0) == [(0.0, 10_000)]


def test_the_child_runs_the_same_command_without_workers_with_reuse_port() -> None:
    argv = ["manage.py", "runserver", "0.0.0.0:8000", "--workers", "4", "--nostatic"]
    assert child_command(argv) == [sys.executable, "manage.py", "runserver", "0.0.0.0:8000", "--nostatic", "--noreload", "--reuse-port"]
    assert child_command(["manage.py", "runserver", "--workers=2", "--noreload", "8000"]) == [
        sys.executable, "manage.py", "runserver", "--noreload", "8000", "--reuse-port"
    ]


def test_children_dying_young_restart_later_and_later_up_to_a_cap() -> None:
    assert restart_delay(0) == 0.0
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays == sorted(delays) and delays[0] > 0
    assert delays[-1] == RESTART_MAX_S
