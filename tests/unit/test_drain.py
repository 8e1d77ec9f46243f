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


class FakeSocket:
    def __init__(self, runtime, log: list[tuple[float, int]]) -> None:
        self.runtime = runtime
        self.log = log

    async def close(self, code: int) -> None:
        import asyncio

        self.log.append((asyncio.get_running_loop().time(), code))
        self.runtime.gone(self)


async def test_the_drain_closes_sockets_with_1012_batch_by_batch_then_closes_the_runtime() -> None:
    import asyncio

    from realtime.runtime import Runtime

    runtime = Runtime()
    log: list[tuple[float, int]] = []
    for _ in range(DRAIN_MIN_BATCH * 3):
        runtime.opened(FakeSocket(runtime, log))
    await runtime.drain(5.0)
    assert runtime.draining and runtime.closed and not runtime.sockets
    assert [code for _, code in log] == [1012] * (DRAIN_MIN_BATCH * 3)
    # A batch closes its sockets in one go; batches are DRAIN_STEP_S apart (or more, on a busy machine).
    times = [at for at, _ in log]
    breaks = [i for i, (a, b) in enumerate(zip(times, times[1:]), 1) if b - a >= DRAIN_STEP_S / 2]
    assert breaks == [DRAIN_MIN_BATCH, 2 * DRAIN_MIN_BATCH]
