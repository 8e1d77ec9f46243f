#!/usr/bin/env python3
"""What counting costs the fan-out: ``Hub.deliver`` with its metrics against the same hub without them.

    .venv/bin/python bench/metrics_cost.py [--sockets 1000] [--messages 500] [--rounds 7]

In one process, no server: one ``Hub`` on channels' in-memory layer with
``--sockets`` subscriptions whose writers write directly (as under daphne) to a
transport that keeps nothing. Each round times ``--messages`` broadcasts through
``deliver`` plus ``flush_metrics`` (what the hub runs per layer message), and the
same through a baseline hub whose ``deliver`` is the one before metrics (no byte
count) and that never flushes; the two alternate, so load from elsewhere falls
on both. Prints ns per delivery (min and median of the rounds) for each, their
difference, and the cost of one counter increment (``timeit``), in this
process's mode (multiprocess when ``PROMETHEUS_MULTIPROC_DIR`` is set).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
os.environ.setdefault("JWT_SECRET", "bench-secret-bench-secret-bench-secret")

from channels.layers import InMemoryChannelLayer  # noqa: E402

from shared import metrics  # noqa: E402
from realtime.hub import Frames, Hub, Subscription  # noqa: E402
from realtime.protocol.message import Vsn  # noqa: E402
from realtime.types import KIND_JSON, BroadcastMessage  # noqa: E402
from realtime.writer import SocketWriter  # noqa: E402

GROUP = "bcast.bench"


class BaselineHub(Hub):
    """``Hub.deliver`` as it was before metrics (no byte count); ``flush_metrics`` does nothing."""

    def deliver(self, message: BroadcastMessage) -> None:
        group_members = self._members(message["group"])
        if not group_members:
            return
        frames = Frames(message)
        origin = message["origin"]
        row_id = message.get("id")
        for sub in group_members:
            if sub.socket_id == origin and not sub.self_broadcast:
                continue
            if row_id is not None and row_id in sub.skip_ids:
                continue
            frame = frames.for_vsn(sub.vsn)
            if frame is not None:
                if sub.held is not None:
                    sub.held.add(row_id, frame)
                else:
                    self._send(sub, frame)

    def flush_metrics(self) -> None:
        pass


def discard(frame: dict[str, Any]) -> None:
    pass


async def build(kind: type[Hub], sockets: int) -> Hub:
    hub = kind(InMemoryChannelLayer())
    for i in range(sockets):
        writer = SocketWriter(discard, discard, 1 << 30, lambda: None)  # type: ignore[arg-type]
        await hub.subscribe(GROUP, Subscription(f"s{i}", "realtime:bench", Vsn.V2, False, writer))
    return hub


def run(hub: Hub, messages: list[BroadcastMessage]) -> float:
    start = time.perf_counter()
    for message in messages:
        hub.deliver(message)
        hub.flush_metrics()
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    mode = "multiprocess" if metrics.MULTIPROCESS_DIR else "single-process"
    messages = [
        BroadcastMessage(
            type="realtime.broadcast", group=GROUP, topic="realtime:bench", origin="", kind=KIND_JSON, event="e",
            encoding=1, payload=b'{"type":"broadcast","event":"e","payload":{"seq":%d}}' % i,
        )
        for i in range(args.messages)
    ]
    with_metrics, baseline = await build(Hub, args.sockets), await build(BaselineHub, args.sockets)
    run(with_metrics, messages[:50]), run(baseline, messages[:50])  # warm up
    timings: dict[str, list[float]] = {"metrics": [], "baseline": []}
    deliveries = args.sockets * args.messages
    for _ in range(args.rounds):
        timings["baseline"].append(run(baseline, messages) / deliveries * 1e9)
        timings["metrics"].append(run(with_metrics, messages) / deliveries * 1e9)
    print(f"{args.sockets} sockets x {args.messages} messages, {args.rounds} rounds, prometheus-client {mode} mode")
    for name in ("baseline", "metrics"):
        values = timings[name]
        print(f"  {name:9} ns/delivery  min {min(values):7.1f}  median {statistics.median(values):7.1f}")
    diff = min(timings["metrics"]) - min(timings["baseline"])
    print(f"  difference (min): {diff:+.1f} ns/delivery ({diff / min(timings['baseline']) * 100:+.1f}%)")
    n = 200_000
    inc = timeit.timeit(metrics.deliveries.inc, number=n) / n * 1e9
    labelled = timeit.timeit(lambda: metrics.limit_hits.labels("bench").inc(), number=n) / n * 1e9
    print(f"  one Counter.inc(): {inc:.0f} ns; labels(...).inc(): {labelled:.0f} ns")
    await with_metrics.aclose()
    await baseline.aclose()


if __name__ == "__main__":
    asyncio.run(main())
