"""``runserver HOST:PORT --workers N``: one parent keeping N server processes on one port.

Each child is an ordinary server process (``runserver HOST:PORT --noreload
--reuse-port``): its own event loop, hub, channel-layer inbox and runtime, so
the per-process fan-out is what it is with one process. The children listen on
the same port with ``SO_REUSEPORT`` rather than sharing one listening socket
passed down as a file descriptor:

* the kernel spreads connections evenly over the children (a hash of the
  addresses); with one shared socket every child is woken for each connection
  and whichever wins takes a whole burst, so the sockets, and with them the
  fan-out work, pile up on one child;
* a draining child closes its own socket and from then on gets no new
  connection, while the others keep theirs;
* processes started apart (another ``runserver --reuse-port``, a new release
  beside the old one) can join the same port.

The cost: connections already queued on a child's socket when it closes are
reset (the clients retry at once) unless ``net.ipv4.tcp_migrate_req=1``
(Linux 5.14+) moves them to the other children.

The parent forwards SIGTERM and SIGINT to every child (each drains, see
``realtime.server.RealtimeServer``; a second signal makes them exit at once)
and waits for them. A child that exits while the parent is not stopping is
started again, after a delay that grows while children keep dying young
(``restart_delay``). Prometheus' multiprocess mode needs one directory shared
by the children: ``PROMETHEUS_MULTIPROC_DIR`` if the operator set it, else a
temporary directory of this parent (removed when it exits); a dead child's
live gauges are removed from it with ``mark_process_dead``. The children run
in their own process group (a terminal's Ctrl-C reaches the parent only, which
forwards it once) and watch the parent's pid, so they drain and stop if it dies.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

logger = logging.getLogger(__name__)

SUPERVISOR_ENV = "REALTIME_SUPERVISOR_PID"  # realtime.server watches it
POLL_S = 0.2
# A child that lived less than STABLE_S counts as a failed start: restarts then wait
# RESTART_MIN_S, doubling up to RESTART_MAX_S; one that lived longer restarts at once.
STABLE_S = 10.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of a child: this one without ``--workers``, with ``--noreload --reuse-port``."""
    args: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        args.append(arg)
    extra = [flag for flag in ("--noreload", "--reuse-port") if flag not in args]
    return [sys.executable, argv[0], *args, *extra]


def restart_delay(failures: int) -> float:
    """Seconds before restarting a child after ``failures`` young deaths in a row (0: restart at once)."""
    if failures <= 0:
        return 0.0
    return float(min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (failures - 1)))


@dataclass(slots=True)
class Child:
    slot: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # young deaths in a row
    restart_at: float | None = None


class Supervisor:
    """Starts ``count`` children running ``command`` and keeps them running until a signal."""

    def __init__(self, command: list[str], count: int) -> None:
        self.command = command
        self.children = [Child(slot) for slot in range(count)]
        self.signals: list[int] = []
        self.stopping = False
        self.own_metrics_dir: str | None = None
        self.env = dict(os.environ)

    def run(self) -> int:
        """Supervise until every child has exited after a SIGTERM or SIGINT; the exit status."""
        metrics_dir = self.env.get("PROMETHEUS_MULTIPROC_DIR", "")
        if not metrics_dir:
            metrics_dir = self.own_metrics_dir = tempfile.mkdtemp(prefix="realtime-metrics-")
            self.env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        self.env[SUPERVISOR_ENV] = str(os.getpid())
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        logger.info(
            "supervising %d server processes (pid %d), metrics in %s", len(self.children), os.getpid(), metrics_dir
        )
        try:
            for child in self.children:
                self._start(child)
            while True:
                self._handle_signals()
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now, metrics_dir)
                if self.stopping and all(child.process is None for child in self.children):
                    return 0
                time.sleep(POLL_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.own_metrics_dir is not None:
                shutil.rmtree(self.own_metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)  # handled by the loop: no logging inside a signal handler

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if self.stopping:
                logger.info("second %s: the server processes exit at once", name)
            else:
                logger.info("%s: stopping the server processes gracefully", name)
            self.stopping = True
            for child in self.children:
                child.restart_at = None
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signum)

    def _start(self, child: Child) -> None:
        env = {**self.env, "REALTIME_WORKER": str(child.slot)}
        # Its own process group: a terminal's Ctrl-C reaches this parent only, which forwards it once.
        child.process = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, process_group=0)
        child.started = time.monotonic()
        child.restart_at = None
        logger.info("server process %d started (pid %d)", child.slot, child.process.pid)

    def _check(self, child: Child, now: float, metrics_dir: str) -> None:
        process = child.process
        if process is not None:
            code = process.poll()
            if code is None:
                return
            child.process = None
            _mark_dead(process.pid, metrics_dir)
            if self.stopping:
                logger.info("server process %d (pid %d) stopped with code %d", child.slot, process.pid, code)
                return
            child.failures = child.failures + 1 if now - child.started < STABLE_S else 0
            delay = restart_delay(child.failures)
            logger.warning(
                "server process %d (pid %d) exited with code %d; restarting in %.1f s",
                child.slot, process.pid, code, delay,
            )
            child.restart_at = now + delay
        if child.restart_at is not None and now >= child.restart_at and not self.stopping:
            self._start(child)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Remove the dead child's live gauges from the multiprocess directory (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]  # unannotated upstream
    except OSError:
        logger.warning("could not remove the metrics of pid %d from %s", pid, metrics_dir, exc_info=True)
