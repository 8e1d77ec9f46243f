"""CPU accounting for the benches, read from ``/proc``: per process, per core, and everyone else's.

``pin()`` splits the cores between the server under test (the first) and the load generator (the
rest); ``cpu_seconds()``/``cpu_times()`` read one process, ``cpu_by_pid()``/``cpu_of()`` a group of
them (PostgreSQL's backends come and go: a vanished pid is skipped), ``core_busy_seconds()`` the
busy time of some cores whoever it is charged to, ``userland_cpu()``/``foreign_cpu()`` what processes
outside the bench used between two snapshots, and ``wait_quiet()`` waits for them to calm down before
a step.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
DISTURBED_PCT = 10.0


def pin(enabled: bool, server_cores: int = 1) -> tuple[set[int] | None, set[int] | None, int]:
    """(server cpus, load generator cpus, load generator cores): with more cpus than ``server_cores``
    and ``enabled``, the server gets the first ``server_cores`` and this process (and the load
    generator it spawns) moves to the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if enabled and len(cpus) > server_cores:
        server, loadgen = set(cpus[:server_cores]), set(cpus[server_cores:])
        os.sched_setaffinity(0, loadgen)
        return server, loadgen, len(loadgen)
    return None, None, len(cpus)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of all threads of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def cpu_or_none(pid: int | None) -> float | None:
    """``cpu_seconds(pid)``, or None without a pid or when the process is gone (e.g. Redis run elsewhere)."""
    if pid is None:
        return None
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` that still exists."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds(pid)
    return out


def cpu_of(pids: Iterable[int]) -> float:
    """CPU seconds of ``pids`` together (those that exist)."""
    return sum(cpu_by_pid(pids).values())


def core_busy_seconds(cpus: set[int] | None) -> float | None:
    """Non-idle time of ``cpus`` (user, system, irq and softirq, whoever it is charged to)."""
    if not cpus:
        return None
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in rest.split()[:7])
                total += user + nice + system + irq + softirq
    return total / CLK_TCK


def idle_seconds() -> float:
    """Idle (and I/O wait) time of the whole machine, all cores summed."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[3] + fields[4]) / CLK_TCK


def userland_cpu() -> dict[int, float]:
    """CPU seconds of every user-space process (kernel threads have an empty cmdline)."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read(1):
                    continue
            out[int(entry)] = cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def foreign_cpu(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU seconds used between two snapshots by processes that are not part of the bench."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid not in ours)


def wait_quiet(limit_s: float, ours: Callable[[], set[int]], service: Callable[[], None] | None = None,
               quiet_pct: float = DISTURBED_PCT) -> None:
    """Up to ``limit_s`` until processes outside ``ours()`` use less than ``quiet_pct`` of a core over
    0.5 s; ``service`` is called every 50 ms meanwhile (e.g. to answer a publisher's pings)."""
    if limit_s <= 0:
        return
    end = time.monotonic() + limit_s
    waited = False
    while True:
        before = userland_cpu()
        t0 = time.monotonic()
        if service is None:
            time.sleep(0.5)
        else:
            while time.monotonic() - t0 < 0.5:
                service()
                time.sleep(0.05)
        busy = 100 * foreign_cpu(before, userland_cpu(), ours()) / (time.monotonic() - t0)
        if busy < quiet_pct:
            if waited:
                print("  (waited for other processes to go quiet)", flush=True)
            return
        if time.monotonic() > end:
            print(f"  (other processes still use {busy:.0f}% of a core after {limit_s:g}s: going on)", flush=True)
            return
        waited = True
