"""Join benchmark: new sockets per second, each connecting, verifying its JWT and joining one topic.

Against a real server process (daphne via ``manage.py runserver``) on the
embedded PostgreSQL and Redis, in a database of its own
(``realtime_bench_joins``, created and migrated by the script) and Redis DB 7,
with ``REALTIME_CHANNEL_ERROR_BACKOFF_MS=0``. Scenarios, each a table:

1. ``public``: open a socket (``?apikey=<anon JWT>&vsn=2.0.0``), send
   ``phx_join`` on a fresh ``realtime:bench-...`` topic with ``{"config":{}}``
   and wait for the ok reply.
2. ``private``: the same with ``config.private: true`` and an
   ``authenticated`` token with a ``sub`` as the join's ``access_token``
   (verified at join, as supabase-js sends it); the policy
   ``bench_joins_read`` (``FOR SELECT TO authenticated USING (realtime.topic()
   LIKE 'bench-%')``) on ``realtime.messages`` is created if missing.
3. ``changes``: one ``postgres_changes`` binding (``*`` on a table this run
   creates and publishes); the ok reply is the join, and the time to the
   ``system`` "Subscribed to PostgreSQL" push is reported separately.

Each scenario attempts rising rates of new sockets per second (``--rates-*``),
``--duration`` seconds each. A socket's join latency runs from the start of
its TCP connect to the ok reply. Per step: joins/s achieved (ok replies over
the time from the first connect to the last ok reply), p50/p99/max latency,
errors by reason, server CPU, load-generator CPU, how late the load generator
started connects (``lag``), PostgreSQL/Redis/other CPU and the kernel's
``ListenOverflows`` (SYNs dropped because the server's accept queue was full;
each costs the client a 1 s SYN retransmit). The sockets of a step stay open
until it ends, then are reset all at once; the time the server takes to go
idle again is ``teardown``. The sustained figure of a scenario is the highest
step whose achieved rate is within 1% of its target, with no errors and p99
<= 250 ms.

4. ``storm``: 5,000 sockets (``--storm-sockets``) joined to 50 public topics,
   then all reset at once and reconnected and rejoined as fast as the client
   side allows (every connect started at once; a failed attempt is retried
   after 1, 2, 5, then every 10 s, as realtime-js does). Reported: the time
   until all are joined again, errors by reason (only configured-limit errors
   are acceptable), and the rate of the initial fill (100 connects in flight
   per worker, a closed-loop ceiling).

Baseline, in the same run: the same load generator against ``raw``, the
minimal ``websockets`` server of ``bench/broadcast.py`` (accepts, reads a
join, answers an ok reply), at rising rates and through the same storm: the
ceiling for connect + handshake + one round trip in Python on this machine.
``raw-nogc`` is the same server with the garbage collector off: with
thousands of sockets held, full collections stall an event loop for 100-500
ms, which sets ``raw``'s p99 long before its CPU runs out. The summary gives
the server CPU per join next to ``raw``'s at the same rate, and the sustained
rate over ``raw-nogc``'s ("vs ceiling").

Targets, printed as PASS/FAIL: >= 1,000 public joins/s and >= 300 private
joins/s sustained (so with p99 <= 250 ms at those rates); the storm rejoined
within 30 s with only configured-limit errors.

The load generator is ``--workers`` processes of this script (``--worker``),
each one ``epoll`` loop of non-blocking sockets with a minimal RFC 6455 client
(``bench/_loadgen.py``). With two or more CPUs the server is pinned to the
first and the load generator to the others (``--no-pin`` to disable);
PostgreSQL and Redis are not pinned. ``lgCPU`` is the load generator's share
of its core(s): near 100% the step measures the client, not the server.

The text output is also written to ``joins.txt`` and a JSON array (one object
per step and storm, then a summary object with the git commit, cores, CPU
model and date) to ``joins.json`` in the log folder (``--json`` to choose).

Usage::

    .venv/bin/python bench/joins.py --quick          # under 2 minutes
    .venv/bin/python bench/joins.py                  # under ~10 minutes
    .venv/bin/python bench/joins.py --scenarios public storm --profile public
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hashlib
import heapq
import hmac
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import _cpu  # noqa: E402
import _loadgen as lg  # noqa: E402
import _pgload as pl  # noqa: E402  (the wide latency histogram: 0.1 ms to 130 s)
import _report  # noqa: E402
import broadcast as bc  # noqa: E402

HOST = "127.0.0.1"
SCENARIOS = ("public", "private", "changes")
BASELINES = ("raw", "raw-nogc")
RATE_PARTS = (*BASELINES, *SCENARIOS)
ALL_PARTS = (*RATE_PARTS, "storm")
DEFAULT_RATES = {
    "raw": [100, 250, 500, 1000, 1500, 2000, 3000, 4000],
    "raw-nogc": [250, 500, 1000, 1500, 2000, 3000, 4000],
    "public": [100, 250, 500, 1000, 1500, 2000],
    "private": [50, 100, 200, 300, 400, 600],
    "changes": [25, 50, 100, 200, 300, 500],
}
QUICK_RATES = {
    "raw": [500, 1000, 2000],
    "raw-nogc": [1000, 2000],
    "public": [250, 1000],
    "private": [100, 300],
    "changes": [50, 150],
}
TARGET_RATE = {"public": 1000.0, "private": 300.0}
P99_LIMIT_MS = 250.0
RATE_TOLERANCE = 0.01
STORM_TARGET_S = 30.0
JOIN_TIMEOUT_S = 10.0  # realtime-js' join timeout
RETRY_AFTER_S = (1.0, 2.0, 5.0, 10.0)  # realtime-js' reconnect and rejoin schedule
DISTURBED_PCT = _cpu.DISTURBED_PCT
POLICY = "bench_joins_read"
TABLE_PREFIX = "bench_joins_"  # table and publication: bench_joins_<pid>
ROLE = "authenticated"
LIMIT_ERROR = re.compile(r"429|Too many|RateLimitReached")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class BenchError(bc.BenchError):
    pass


def mint_token(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 JWT with the given claims."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = b64(hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    return f"{header}.{body}.{signature}"


# =====================================================================================
# The load-generator worker (``joins.py --worker CONFIG``)
# =====================================================================================

CONNECTING, HANDSHAKE, JOINING, SUBSCRIBING, OPEN = range(5)
STAGE = {CONNECTING: "connect", HANDSHAKE: "handshake", JOINING: "join", SUBSCRIBING: "subscribe", OPEN: "held"}
LINGER_RESET = struct.pack("ii", 1, 0)


class Conn:
    __slots__ = ("sock", "fd", "state", "t0", "buf", "accept", "frame", "job", "slot", "topic")

    def __init__(self) -> None:
        self.buf = b""


class Job:
    """One command's worth of connects: on a schedule (``rate``), with a cap in flight (``fill``),
    or all at once with retries (``storm``)."""

    def __init__(self, msg: dict[str, Any], now: int) -> None:
        self.kind: str = msg["kind"]
        self.step = int(msg.get("step", 0))
        self.count = int(msg.get("count", 0))
        self.rate = float(msg.get("rate", 0))
        self.phase = float(msg.get("phase", 0))
        self.start_ns = int(msg.get("start_at_ns", now))
        self.inflight_cap = int(msg.get("inflight", 0)) or 1 << 30
        self.timeout_ns = int(float(msg.get("timeout_s", JOIN_TIMEOUT_S)) * 1e9)
        self.deadline_ns = self.start_ns + int(float(msg.get("deadline_s", 3600)) * 1e9)
        self.wait_system = bool(msg.get("wait_system", False))
        self.topic_prefix: str = msg.get("topic_prefix", "bench-")
        self.topics = int(msg.get("topics", 0))  # 0: a fresh topic per socket
        self.join_prefix: bytes = msg["join_prefix"].encode()
        self.suffixes = [s.encode() for s in msg["suffixes"]]
        self.retry = bool(msg.get("retry", False))
        self.next = 0  # next slot to start (rate, fill)
        self.pending: set[Conn] = set()
        self.retries: list[tuple[int, int]] = []  # heap of (due_ns, slot)
        self.attempts: Counter[int] = Counter()
        self.ok = 0
        self.failed = 0
        self.sys_ok = 0
        self.errors: Counter[str] = Counter()
        self.hist = [0] * pl.NBUCKETS
        self.sys_hist = [0] * pl.NBUCKETS
        self.rejoin_hist = [0] * pl.NBUCKETS
        self.max_us = 0
        self.sys_max_us = 0
        self.first_start_ns = 0
        self.last_ok_ns = 0
        self.last_sys_ns = 0
        self.lag_max_us = 0
        self.late = 0  # connects started > 5 ms after their due time
        self.cpu0 = time.process_time()
        self.slot_topics: list[str] = list(msg.get("slot_topics", []))
        if self.slot_topics:
            self.count = len(self.slot_topics)

    def topic(self, slot: int) -> str:
        if self.slot_topics:
            return self.slot_topics[slot]
        return f"{self.topic_prefix}{slot % self.topics if self.topics else slot}"

    def due_ns(self, slot: int) -> int:
        return self.start_ns + int((slot + self.phase) / self.rate * 1e9)

    def resolved(self) -> int:
        return self.ok + self.failed

    def finished(self) -> bool:
        return self.resolved() >= self.count

    def result(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "step": self.step, "count": self.count, "ok": self.ok, "failed": self.failed,
            "sys_ok": self.sys_ok, "errors": dict(self.errors),
            "hist": [[i, c] for i, c in enumerate(self.hist) if c],
            "sys_hist": [[i, c] for i, c in enumerate(self.sys_hist) if c],
            "rejoin_hist": [[i, c] for i, c in enumerate(self.rejoin_hist) if c],
            "max_us": self.max_us, "sys_max_us": self.sys_max_us,
            "first_start_ns": self.first_start_ns, "last_ok_ns": self.last_ok_ns, "last_sys_ns": self.last_sys_ns,
            "lag_max_us": self.lag_max_us, "late": self.late, "attempts": sum(self.attempts.values()),
            "cpu": time.process_time() - self.cpu0,
        }


class JoinWorker:
    """The worker's single epoll loop: control lines on stdin, every socket of the worker."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.host: str = cfg["host"]
        self.port = int(cfg["port"])
        self.request_head = (
            f"GET {cfg['path']} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        ).encode()
        self.ep = select.epoll(1024)
        self.ep.register(0, select.EPOLLIN)
        self.by_fd: dict[int, Conn] = {}
        self.held: dict[int, Conn] = {}
        self.held_lost: Counter[str] = Counter()
        self.job: Job | None = None
        self.rbuf = bytearray(1 << 18)
        self.rview = memoryview(self.rbuf)
        self.running = True

    # --- connects ----------------------------------------------------------

    def start(self, job: Job, slot: int, now: int) -> None:
        conn = Conn()
        conn.job, conn.slot, conn.topic = job, slot, job.topic(slot)
        conn.frame = lg.client_frame(1, job.join_prefix + conn.topic.encode() + job.suffixes[slot % len(job.suffixes)])
        conn.t0 = now
        job.attempts[slot] += 1
        if not job.first_start_ns:
            job.first_start_ns = now
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as error:
            self.fail_slot(job, slot, f"socket {errno.errorcode.get(error.errno or 0, error)}", now)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock, conn.fd, conn.state = sock, sock.fileno(), CONNECTING
        code = sock.connect_ex((self.host, self.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.fail_slot(job, slot, f"connect {errno.errorcode.get(code, code)}", now)
            return
        self.by_fd[conn.fd] = conn
        job.pending.add(conn)
        self.ep.register(conn.fd, select.EPOLLOUT | select.EPOLLIN)

    def send_handshake(self, conn: Conn) -> None:
        key = base64.b64encode(os.urandom(16))
        conn.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        conn.sock.send(self.request_head + key + b"\r\n\r\n")
        conn.state = HANDSHAKE
        self.ep.modify(conn.fd, select.EPOLLIN)

    # --- outcomes ----------------------------------------------------------

    def reset(self, conn: Conn) -> None:
        self.by_fd.pop(conn.fd, None)
        self.held.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(conn.fd)
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def fail(self, conn: Conn, reason: str, now: int) -> None:
        job = conn.job
        job.pending.discard(conn)
        self.reset(conn)
        self.fail_slot(job, conn.slot, reason, now)

    def fail_slot(self, job: Job, slot: int, reason: str, now: int) -> None:
        job.errors[reason] += 1
        if job.retry and now < job.deadline_ns:
            tries = job.attempts[slot]
            delay = RETRY_AFTER_S[min(tries, len(RETRY_AFTER_S)) - 1]
            heapq.heappush(job.retries, (now + int(delay * 1e9), slot))
        else:
            job.failed += 1

    def joined(self, conn: Conn, now: int) -> None:
        job = conn.job
        lat = (now - conn.t0) // 1000
        job.hist[pl.bucket(lat)] += 1
        job.max_us = max(job.max_us, lat)
        if job.kind == "storm":
            job.rejoin_hist[pl.bucket((now - job.start_ns) // 1000)] += 1
        job.ok += 1
        job.last_ok_ns = now
        if job.wait_system:
            conn.state = SUBSCRIBING
        else:
            self.settle(conn)

    def subscribed(self, conn: Conn, now: int) -> None:
        job = conn.job
        lat = (now - conn.t0) // 1000
        job.sys_hist[pl.bucket(lat)] += 1
        job.sys_max_us = max(job.sys_max_us, lat)
        job.sys_ok += 1
        job.last_sys_ns = now
        self.settle(conn)

    def settle(self, conn: Conn) -> None:
        conn.state = OPEN
        conn.job.pending.discard(conn)
        self.held[conn.fd] = conn

    # --- reading -------------------------------------------------------------

    def on_event(self, conn: Conn, ev: int, now: int) -> None:
        if conn.state == CONNECTING:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(conn, f"connect {errno.errorcode.get(code, code)}", now)
                return
            if not ev & select.EPOLLOUT:
                return
            try:
                self.send_handshake(conn)
            except OSError as error:
                self.fail(conn, f"connect {errno.errorcode.get(error.errno or 0, error)}", now)
            return
        try:
            got = conn.sock.recv_into(self.rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.lost(conn, errno.errorcode.get(error.errno or 0, str(error)), now)
            return
        if not got:
            self.lost(conn, "eof", now)
            return
        data = conn.buf + self.rview[:got].tobytes() if conn.buf else self.rview[:got].tobytes()
        conn.buf = b""
        if conn.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                conn.buf = data
                return
            head, data = data[:end], data[end + 4:]
            status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            if " 101 " not in status + " ":
                body = data[:200].decode("utf-8", "replace")
                match = re.search(r'"error":"([^"]*)"', body)
                self.fail(conn, f"handshake {' '.join(status.split()[1:2])} {match.group(1) if match else body[:60]}".rstrip(), now)
                return
            if conn.accept not in head:
                self.fail(conn, "handshake bad Sec-WebSocket-Accept", now)
                return
            try:
                conn.sock.send(conn.frame)
            except OSError as error:
                self.fail(conn, f"join {errno.errorcode.get(error.errno or 0, error)}", now)
                return
            conn.state = JOINING
            if not data:
                return
        self.on_frames(conn, data, now)

    def on_frames(self, conn: Conn, data: bytes, now: int) -> None:
        spans, pos = lg.frame_spans(data)
        for b0, start, end in spans:
            opcode = b0 & 0x0F
            if opcode == 1 and conn.state != OPEN:
                payload = data[start:end]
                if conn.state == JOINING:
                    if payload.startswith(b'["1","1",') and b'"phx_reply"' in payload:
                        if b'"status":"ok"' in payload:
                            self.joined(conn, now)
                        else:
                            match = re.search(rb'"reason":"([^":]*)', payload)
                            self.fail(conn, "join " + (match.group(1).decode() if match else payload[:80].decode()), now)
                            return
                elif conn.state == SUBSCRIBING and b'"system"' in payload:
                    if b'"status":"ok"' in payload and b"Subscribed to PostgreSQL" in payload:
                        self.subscribed(conn, now)
                    elif b'"status":"error"' in payload:
                        match = re.search(rb'"message":"([^"]{0,60})', payload)
                        self.fail(conn, "subscribe error " + (match.group(1).decode() if match else "?"), now)
                        return
            elif opcode == 9:
                with contextlib.suppress(OSError):
                    conn.sock.send(lg.client_frame(0xA, data[start:end]))
            elif opcode == 8:
                code = int.from_bytes(data[start:start + 2], "big") if end - start >= 2 else 1005
                self.lost(conn, f"close {code}", now)
                return
        if pos < len(data):
            conn.buf = data[pos:]

    def lost(self, conn: Conn, why: str, now: int) -> None:
        if conn.state == OPEN:
            self.held_lost[why] += 1
            self.reset(conn)
        else:
            self.fail(conn, f"{STAGE[conn.state]} {why}", now)

    # --- jobs ----------------------------------------------------------------

    def advance(self, job: Job, now: int) -> int | None:
        """Start what is due; the next due time (ns) or None."""
        if now < job.start_ns:
            return job.start_ns
        if job.kind == "rate":
            while job.next < job.count:
                due = job.due_ns(job.next)
                if due > now:
                    return due
                lag = (now - due) // 1000
                job.lag_max_us = max(job.lag_max_us, lag)
                if lag > 5000:
                    job.late += 1
                self.start(job, job.next, now)
                job.next += 1
                now = time.monotonic_ns()
        else:
            while job.next < job.count and len(job.pending) < job.inflight_cap:
                self.start(job, job.next, time.monotonic_ns())
                job.next += 1
        while job.retries and job.retries[0][0] <= now:
            _, slot = heapq.heappop(job.retries)
            self.start(job, slot, time.monotonic_ns())
        return job.retries[0][0] if job.retries else None

    def expire(self, job: Job, now: int) -> None:
        for conn in [c for c in job.pending if now - c.t0 > job.timeout_ns or now > job.deadline_ns]:
            self.fail(conn, f"{STAGE[conn.state]} timeout", now)
        if now > job.deadline_ns:
            job.failed += len(job.retries)
            job.retries.clear()

    def storm(self, msg: dict[str, Any], now: int) -> Job:
        """Reset every held socket at ``start_at_ns`` and rejoin each one's topic."""
        start = int(msg["start_at_ns"])
        delay = (start - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        topics = []
        for conn in list(self.held.values()):
            topics.append(conn.topic)
            self.reset(conn)
        msg = dict(msg, slot_topics=topics)
        return Job(msg, time.monotonic_ns())

    # --- control -------------------------------------------------------------

    def control(self, line: bytes) -> None:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        now = time.monotonic_ns()
        if cmd == "run":
            if self.job is not None:
                emit({"error": "a job is running"})
                return
            self.job = self.storm(msg, now) if msg["kind"] == "storm" else Job(msg, now)
            if self.job.count == 0:
                emit(self.job.result())
                self.job = None
        elif cmd == "reset_all":
            count = len(self.held)
            for conn in list(self.held.values()):
                self.reset(conn)
            emit({"reset": count, "lost": dict(self.held_lost)})
            self.held_lost.clear()
        elif cmd == "status":
            emit({"held": len(self.held), "cpu": time.process_time(), "lost": dict(self.held_lost)})
        elif cmd == "quit":
            emit({"bye": True})
            self.running = False
        else:
            emit({"error": f"unknown command {cmd!r}"})

    def run(self) -> None:
        ctl_buf = b""
        last_scan = 0
        while self.running:
            now = time.monotonic_ns()
            timeout = 0.2
            job = self.job
            if job is not None:
                due = self.advance(job, now)
                now = time.monotonic_ns()
                if now - last_scan > 50_000_000:
                    last_scan = now
                    self.expire(job, now)
                if job.finished() and not job.pending and not job.retries and job.next >= job.count:
                    emit(job.result())
                    self.job = None
                elif due is not None:
                    timeout = min(timeout, max(0.0, (due - now) / 1e9))
                else:
                    timeout = 0.05
            events = self.ep.poll(timeout)
            now = time.monotonic_ns()
            for fd, ev in events:
                if fd == 0:
                    ctl_buf, going = lg.read_control(ctl_buf, lambda line: (self.control(line), self.running)[1])
                    if not going:
                        self.running = False
                    continue
                conn = self.by_fd.get(fd)
                if conn is not None:
                    self.on_event(conn, ev, now)
        for conn in list(self.by_fd.values()):
            self.reset(conn)


def emit(obj: dict[str, Any]) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


# =====================================================================================
# The controller
# =====================================================================================


@dataclass
class Step:
    scenario: str
    server: str
    target: float
    duration_s: float
    started: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    achieved: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float = 0.0
    sys_ok: int | None = None
    sys_p50_ms: float | None = None
    sys_p99_ms: float | None = None
    sys_max_ms: float | None = None
    server_cpu_pct: float = 0.0
    server_cpu_s: float = 0.0
    core_pct: float | None = None
    loadgen_cpu_pct: float = 0.0
    lag_max_ms: float = 0.0
    late: int = 0
    pg_cpu_pct: float = 0.0
    redis_cpu_pct: float | None = None
    others_cpu_pct: float = 0.0
    overflows: int = 0
    teardown_s: float | None = None
    held_lost: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def passed(self) -> bool:
        return (self.ok > 0 and self.error_count == 0 and self.achieved >= self.target * (1 - RATE_TOLERANCE)
                and self.p99_ms is not None and self.p99_ms <= P99_LIMIT_MS)


@dataclass
class Storm:
    server: str
    sockets: int
    topics: int
    fill_s: float = 0.0
    fill_joined: int = 0
    fill_errors: dict[str, int] = field(default_factory=dict)
    rss_idle_mb: float | None = None
    rss_joined_mb: float | None = None
    rejoined: int = 0
    all_joined_s: float | None = None
    rejoin_p50_s: float | None = None
    rejoin_p99_s: float | None = None
    attempts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    join_p50_ms: float | None = None
    join_p99_ms: float | None = None
    server_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    overflows: int = 0
    error: str | None = None

    @property
    def fill_rate(self) -> float:
        return self.fill_joined / self.fill_s if self.fill_s else 0.0

    @property
    def other_errors(self) -> int:
        return sum(c for reason, c in self.errors.items() if not LIMIT_ERROR.search(reason))

    @property
    def passed(self) -> bool:
        return (self.all_joined_s is not None and self.all_joined_s <= STORM_TARGET_S and self.other_errors == 0
                and self.rejoined == self.sockets)


@dataclass
class Scenario:
    name: str
    server: str
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    profile: str | None = None

    @property
    def sustained(self) -> Step | None:
        return max((s for s in self.steps if s.passed), key=lambda s: s.target, default=None)

    @property
    def peak(self) -> Step | None:
        return max(self.steps, key=lambda s: s.achieved, default=None)


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace (SYNs dropped on a full accept queue)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def merge_hist(replies: list[dict[str, Any]], key: str) -> tuple[list[int], int]:
    hist = [0] * pl.NBUCKETS
    for reply in replies:
        for i, c in reply[key]:
            hist[i] += c
    return hist, sum(hist)


class JoinWorkerProc(bc.Worker):
    """A ``joins.py --worker`` process driven by JSON lines."""

    def __init__(self, index: int, cfg: dict[str, Any], cpus: set[int] | None, log: Any) -> None:
        self.index = index
        self.proc = bc.spawn([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                             cpus=cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.buf = b""
        self.info: dict[str, Any] = {}


class Server:
    def __init__(self, kind: str, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.kind, self.proc, self.port, self.log_path = kind, proc, port, log_path


class Bench:
    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.server_cpus, self.loadgen_cpus, self.loadgen_cores = _cpu.pin(args.pin)
        secret = env["JWT_SECRET"]
        now = int(time.time())
        self.anon = mint_token(secret, {"role": "anon", "iss": "supabase", "iat": now, "exp": now + 6 * 3600})
        self.users = [
            mint_token(secret, {"role": ROLE, "aud": ROLE, "sub": str(uuid.uuid4()), "iat": now, "exp": now + 6 * 3600})
            for _ in range(args.users)
        ]
        self.path = f"/realtime/v1/websocket?apikey={self.anon}&vsn=2.0.0"
        self.redis_pid = bc.redis_pid()
        self.tag = f"{os.getpid()}"
        self.table = f"{TABLE_PREFIX}{self.tag}"
        self.prefix = f"rtbenchjoins{os.getpid()}"
        self.env.update(REALTIME_LAYER_PREFIX=self.prefix, REALTIME_PUBLICATION=self.table,
                        REALTIME_CHANNEL_ERROR_BACKOFF_MS="0", REALTIME_IDLE_TIMEOUT_S="3600", PYTHONUNBUFFERED="1")
        self.servers = 0
        self.step_id = 0
        self.table_created = False
        self.records: list[dict[str, Any]] = []

    # --- database -------------------------------------------------------------

    def prepare_database(self) -> None:
        """Create this bench's database if missing, migrate it, add the policy, the table and its publication."""
        import psycopg
        from psycopg import sql

        dsn = self.env["DATABASE_URL"]
        parts = urlsplit(dsn)
        name = parts.path.lstrip("/")
        admin = urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(admin, autocommit=True, application_name="realtime bench joins admin") as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"  created database {name}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=self.args.server_dir, env=self.env,
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise BenchError(f"manage.py migrate failed: {result.stderr[-1500:]}")
        print(f"  migrated {name} in {time.monotonic() - started:.1f}s", flush=True)
        with psycopg.connect(dsn, autocommit=True, application_name="realtime bench joins setup") as conn:
            conn.execute(sql.SQL(
                "DO $b$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'realtime' AND "
                "tablename = 'messages' AND policyname = {name}) THEN CREATE POLICY {policy} ON realtime.messages "
                "FOR SELECT TO {role} USING (realtime.topic() LIKE 'bench-%'); END IF; END $b$"
            ).format(name=sql.Literal(POLICY), policy=sql.Identifier(POLICY), role=sql.Identifier(ROLE)))
            for (stale,) in conn.execute("SELECT pubname FROM pg_publication WHERE pubname LIKE %s",
                                         (TABLE_PREFIX + "%",)).fetchall():
                pid = stale[len(TABLE_PREFIX):]
                if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(stale)))
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", stale)))
            table = sql.Identifier("public", self.table)
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY, payload text)").format(table))
            self.table_created = True
            conn.execute(sql.SQL("GRANT SELECT ON {} TO anon, authenticated").format(table))
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(self.table), table))

    def drop_table(self) -> None:
        if not self.table_created:
            return
        import psycopg
        from psycopg import sql

        with contextlib.suppress(Exception), psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.table)))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", self.table)))
        self.table_created = False

    # --- processes ------------------------------------------------------------

    def start_server(self, kind: str, label: str) -> Server:
        self.servers += 1
        port = bc.free_port()
        log_path = self.log_dir / f"server-{self.servers}-{label}.log"
        log = open(log_path, "wb")
        if kind == "raw":
            cmd = [sys.executable, str(BENCH_DIR / "broadcast.py"), "--raw-server-port", str(port)]
        elif kind == "raw-nogc":
            # The same server with the cyclic garbage collector off: with thousands of sockets held, its full
            # collections stall the loop for 100-500 ms and set the raw server's p99.
            code = (f"import gc, sys; gc.disable(); sys.path.insert(0, {str(BENCH_DIR)!r}); import broadcast; "
                    f"broadcast.run_raw_server({port})")
            cmd = [sys.executable, "-c", code]
        elif self.args.daphne_backlog:
            # An experiment, not the server as shipped: daphne's endpoint with a listen backlog other than Twisted's 50.
            code = ("import sys, daphne.endpoints as e; f = e.build_endpoint_description_strings; "
                    "e.build_endpoint_description_strings = lambda **k: "
                    f"[s + ':backlog={self.args.daphne_backlog}' if s.startswith('tcp:') else s for s in f(**k)]; "
                    "sys.argv[0] = 'manage.py'; import manage; manage.main()")
            cmd = [sys.executable, "-c", code, "runserver", f"{HOST}:{port}", "--noreload"]
        else:
            cmd = [sys.executable, "manage.py", "runserver", f"{HOST}:{port}", "--noreload"]
        proc = bc.spawn(cmd, cpus=self.server_cpus, env=self.env, cwd=self.args.server_dir, stdout=log,
                        stderr=subprocess.STDOUT)
        log.close()
        bc.wait_port(port, proc, 90)
        return Server(kind, proc, port, log_path)

    def stop_server(self, server: Server, label: str) -> None:
        bc.stop(server.proc, timeout=10)
        bc.report_server_log(server.log_path, label)

    def start_workers(self, server: Server) -> list[JoinWorkerProc]:
        cfg = {"host": HOST, "port": server.port, "path": self.path}
        log = open(self.log_dir / "loadgen.log", "ab")
        workers = [JoinWorkerProc(i, cfg, self.loadgen_cpus, log) for i in range(self.args.workers)]
        log.close()
        return workers

    def stop_workers(self, workers: list[JoinWorkerProc]) -> None:
        for w in workers:
            w.quit()

    def join_template(self, scenario: str) -> tuple[str, list[str], bool]:
        """(frame prefix up to the topic, the frame suffixes after it, whether to wait for the system push)."""
        prefix = '["1","1","realtime:'
        if scenario == "private":
            return prefix, [f'","phx_join",{{"config":{{"private":true}},"access_token":"{t}"}}]' for t in self.users], False
        if scenario == "changes":
            binding = json.dumps({"event": "*", "schema": "public", "table": self.table}, separators=(",", ":"))
            return prefix, [f'","phx_join",{{"config":{{"postgres_changes":[{binding}]}}}}]'], True
        return prefix, ['","phx_join",{"config":{}}]'], False

    # --- measurements -----------------------------------------------------------

    def ours(self) -> set[int]:
        pids = {os.getpid(), *(p.pid for p in bc._children), *_report.postgres_pids()}
        if self.redis_pid:
            pids.add(self.redis_pid)
        return pids

    def snapshot(self, server: Server, workers: list[JoinWorkerProc]) -> dict[str, Any]:
        return {
            "wall": time.monotonic(), "server": _cpu.cpu_seconds(server.proc.pid),
            "core": _cpu.core_busy_seconds(self.server_cpus), "pg": _cpu.cpu_of(_report.postgres_pids()),
            "redis": _cpu.cpu_or_none(self.redis_pid),
            "userland": _cpu.userland_cpu(), "ours": self.ours(), "overflows": listen_overflows(),
            "self": time.process_time(),
        }

    def wait_quiet(self) -> None:
        """Up to --quiet-wait s until processes that are not part of the bench use < DISTURBED_PCT of a core."""
        _cpu.wait_quiet(self.args.quiet_wait, self.ours)

    def wait_idle(self, server: Server, limit: float = 30.0) -> float:
        """Seconds until the server uses < 5% of a core over 0.25 s (its teardown of the last step is done)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            c0, w0 = _cpu.cpu_seconds(server.proc.pid), time.monotonic()
            time.sleep(0.25)
            if (_cpu.cpu_seconds(server.proc.pid) - c0) / (time.monotonic() - w0) < 0.05:
                return max(0.0, time.monotonic() - t0 - 0.25)
        return time.monotonic() - t0

    def collect(self, workers: list[JoinWorkerProc], timeout: float) -> list[dict[str, Any]]:
        replies = []
        deadline = time.monotonic() + timeout
        for w in workers:
            reply = w.read(max(0.1, deadline - time.monotonic()))
            if reply is None:
                raise BenchError(f"load-generator worker {w.index} did not finish within {timeout:.0f}s")
            if "error" in reply:
                raise BenchError(f"load-generator worker {w.index}: {reply['error']}")
            replies.append(reply)
        return replies

    def reset_all(self, workers: list[JoinWorkerProc]) -> dict[str, int]:
        lost: Counter[str] = Counter()
        for w in workers:
            lost.update(w.rpc({"cmd": "reset_all"}, timeout=30).get("lost", {}))
        return dict(lost)

    # --- rate steps ---------------------------------------------------------------

    def step(self, scenario: str, server: Server, workers: list[JoinWorkerProc], rate: float, duration: float,
             tag: str = "") -> Step:
        self.step_id += 1
        k = len(workers)
        count = max(1, round(rate * duration))
        join_prefix, suffixes, wait_system = self.join_template(scenario)
        st = Step(scenario=scenario, server=server.kind, target=rate, duration_s=duration)
        s0 = self.snapshot(server, workers)
        start_at = time.monotonic_ns() + 200_000_000
        for i, w in enumerate(workers):
            n = count // k + (1 if i < count % k else 0)
            w.send({"cmd": "run", "kind": "rate", "step": self.step_id, "count": n, "rate": rate / k, "phase": i / k,
                    "start_at_ns": start_at, "timeout_s": self.args.join_timeout,
                    "topic_prefix": f"bench-{scenario[:3]}-{self.tag}-{self.step_id}{tag}-{i}-",
                    "join_prefix": join_prefix, "suffixes": suffixes, "wait_system": wait_system})
        replies = self.collect(workers, duration + self.args.join_timeout + 30)
        s1 = self.snapshot(server, workers)
        wall = max(1e-6, s1["wall"] - start_at / 1e9)
        st.started = count
        st.ok = sum(r["ok"] for r in replies)
        st.failed = sum(r["failed"] for r in replies)
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
        st.errors = dict(errors)
        first = min((r["first_start_ns"] for r in replies if r["first_start_ns"]), default=0)
        last = max((r["last_ok_ns"] for r in replies), default=0)
        st.achieved = st.ok / ((last - first) / 1e9) if st.ok and last > first else 0.0
        hist, total = merge_hist(replies, "hist")
        st.p50_ms, st.p99_ms = pl.percentile_ms(hist, total, 0.5), pl.percentile_ms(hist, total, 0.99)
        st.max_ms = max(r["max_us"] for r in replies) / 1000
        if wait_system:
            shist, stotal = merge_hist(replies, "sys_hist")
            st.sys_ok = stotal
            st.sys_p50_ms, st.sys_p99_ms = pl.percentile_ms(shist, stotal, 0.5), pl.percentile_ms(shist, stotal, 0.99)
            st.sys_max_ms = max(r["sys_max_us"] for r in replies) / 1000
        self.fill_cpu(st, s0, s1, wall, sum(r["cpu"] for r in replies))
        st.lag_max_ms = max(r["lag_max_us"] for r in replies) / 1000
        st.late = sum(r["late"] for r in replies)
        # The step's sockets go at once; the server's teardown is timed, not measured as part of the step.
        st.held_lost = self.reset_all(workers)
        st.teardown_s = self.wait_idle(server)
        if server.proc.poll() is not None:
            raise BenchError(f"server exited with code {server.proc.returncode}")
        return st

    def fill_cpu(self, st: Step | Storm, s0: dict[str, Any], s1: dict[str, Any], wall: float, worker_cpu: float) -> None:
        st.server_cpu_pct = 100 * (s1["server"] - s0["server"]) / wall
        if isinstance(st, Step):
            st.server_cpu_s = s1["server"] - s0["server"]
        st.loadgen_cpu_pct = 100 * (worker_cpu + s1["self"] - s0["self"]) / wall / self.loadgen_cores
        st.overflows = s1["overflows"] - s0["overflows"]
        if isinstance(st, Step):
            if s0["core"] is not None and s1["core"] is not None:
                st.core_pct = 100 * (s1["core"] - s0["core"]) / wall
            st.pg_cpu_pct = 100 * (s1["pg"] - s0["pg"]) / wall
            if s0["redis"] is not None and s1["redis"] is not None:
                st.redis_cpu_pct = 100 * (s1["redis"] - s0["redis"]) / wall
            st.others_cpu_pct = 100 * _cpu.foreign_cpu(s0["userland"], s1["userland"], s0["ours"] | s1["ours"]) / wall

    def warm_up(self, scenario: str, server: Server, workers: list[JoinWorkerProc]) -> None:
        """A few unmeasured joins: imports, pools and caches are warm before the first step."""
        st = self.step(scenario, server, workers, 50, 1.0, tag="w")
        if st.error_count or not st.ok:
            raise BenchError(f"warm-up joins failed: {st.ok} ok, errors {st.errors}")

    def run_rates(self, label: str, kind: str, rates: list[float]) -> Scenario:
        result = Scenario(label, kind)
        scenario = "public" if label in BASELINES else label  # the baselines answer a public join
        server = self.start_server(kind, label)
        workers: list[JoinWorkerProc] = []
        try:
            workers = self.start_workers(server)
            self.warm_up(scenario, server, workers)
            print("  " + STEP_HEADER, flush=True)
            failures = 0
            for rate in rates:
                if time.monotonic() > self.args.deadline - 20:
                    print("  (time budget nearly spent: stopping the steps)", flush=True)
                    break
                self.wait_quiet()
                st = self.step(scenario, server, workers, rate, self.args.duration)
                st.scenario = label
                if not st.passed and st.others_cpu_pct >= DISTURBED_PCT and not self.args.quick:
                    print("  " + step_row(st) + f"  (others used {st.others_cpu_pct:.0f}% of a core: retrying)", flush=True)
                    if st.errors:
                        print("      errors: " + fmt_errors(st.errors), flush=True)
                    self.wait_quiet()
                    st = self.step(scenario, server, workers, rate, self.args.duration)
                    st.scenario = label
                result.steps.append(st)
                self.records.append({"type": "step", **asdict(st), "passed": st.passed})
                print("  " + step_row(st), flush=True)
                if st.errors:
                    print("      errors: " + fmt_errors(st.errors), flush=True)
                if st.held_lost:
                    print("      held sockets closed by the server: " + fmt_errors(st.held_lost), flush=True)
                # Go on past a step that failed only on p99 at the full rate; stop after two that fell short
                # of the rate, or at once when one is far off.
                # The step at a scenario's target rate is always run, for its PASS/FAIL.
                short = not st.passed and (st.achieved < 0.95 * rate or st.error_count > 0)
                failures = failures + 1 if short else 0
                if rate < TARGET_RATE.get(label, 0):
                    continue
                if failures >= 2 or (not st.passed and (st.achieved < 0.8 * rate or (st.p99_ms or 0) > 2000
                                                        or st.error_count > 0.05 * st.started)):
                    break
            if label in self.args.profile:
                result.profile = self.profile(label, server, workers, result)
        except (BenchError, OSError) as error:
            result.error = str(error) or repr(error)
            print(f"  ERROR: {result.error}", flush=True)
        finally:
            self.stop_workers(workers)
            self.stop_server(server, label)
        return result

    def profile(self, label: str, server: Server, workers: list[JoinWorkerProc], result: Scenario) -> str | None:
        import shutil

        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if pyspy is None:
            print("  (py-spy not found: no profile; `.venv/bin/pip install py-spy` to enable)", flush=True)
            return None
        failing = [s.target for s in result.steps if not s.passed]
        rate = min(failing) if failing else max((s.target for s in result.steps), default=100)
        secs = self.args.profile_seconds
        out = self.log_dir / f"profile-{label}.txt"
        cmd = [pyspy, "record", "--pid", str(server.proc.pid), "--duration", str(int(secs) + 2), "--rate", "200",
               "--format", "raw", "--output", str(out)]
        # --native (C frames such as the collector's) only works when py-spy stops the process for each sample.
        cmd += ["--native"] if self.args.profile_native else ["--nonblocking"]
        print(f"  profiling the server with py-spy during {secs:g}s at {rate:g} joins/s", flush=True)
        spy = bc.spawn(cmd, cpus=self.loadgen_cpus, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            st = self.step("public" if label in BASELINES else label, server, workers, rate, secs)
            print("  " + step_row(st) + "  (under py-spy)", flush=True)
            spy.wait(secs + 60)
            if spy.returncode != 0 or not out.exists():
                return None
            return bc.summarize_profile(out.read_text(), f"{label} server at {rate:g} joins/s target "
                                                         f"({st.achieved:,.0f} achieved, server CPU {st.server_cpu_pct:.0f}%)")
        finally:
            bc.stop(spy)

    # --- the storm ----------------------------------------------------------------

    def storm(self, kind: str) -> Storm:
        n, topics = self.args.storm_sockets, self.args.storm_topics
        st = Storm(kind, n, topics)
        label = f"storm-{kind}"
        server = self.start_server(kind, label)
        workers: list[JoinWorkerProc] = []
        try:
            workers = self.start_workers(server)
            k = len(workers)
            join_prefix, suffixes, _ = self.join_template("public")
            self.wait_quiet()
            st.rss_idle_mb = bc.rss_kb(server.proc.pid) / 1024
            t0 = time.monotonic()
            for i, w in enumerate(workers):
                w.send({"cmd": "run", "kind": "fill", "step": 0, "count": n // k + (1 if i < n % k else 0),
                        "inflight": self.args.fill_inflight, "timeout_s": self.args.join_timeout,
                        "topic_prefix": f"bench-storm-{self.tag}-", "topics": topics,
                        "join_prefix": join_prefix, "suffixes": suffixes})
            replies = self.collect(workers, 60 + n / 20)
            st.fill_s = time.monotonic() - t0
            st.fill_joined = sum(r["ok"] for r in replies)
            fill_errors: Counter[str] = Counter()
            for r in replies:
                fill_errors.update(r["errors"])
            st.fill_errors = dict(fill_errors)
            print(f"  fill: {st.fill_joined:,}/{n:,} joined to {topics} topics in {st.fill_s:.1f}s "
                  f"({st.fill_rate:,.0f} joins/s, {self.args.fill_inflight} in flight per worker)"
                  + (f"; errors: {fmt_errors(st.fill_errors)}" if st.fill_errors else ""), flush=True)
            self.wait_idle(server)
            st.rss_joined_mb = bc.rss_kb(server.proc.pid) / 1024
            held = sum(int(w.rpc({"cmd": "status"})["held"]) for w in workers)
            st.sockets = held
            self.wait_quiet()
            s0 = self.snapshot(server, workers)
            start_at = time.monotonic_ns() + 300_000_000
            for w in workers:
                w.send({"cmd": "run", "kind": "storm", "start_at_ns": start_at, "timeout_s": self.args.join_timeout,
                        "deadline_s": self.args.storm_limit, "retry": True,
                        "join_prefix": join_prefix, "suffixes": suffixes})
            replies = self.collect(workers, self.args.storm_limit + self.args.join_timeout + 30)
            s1 = self.snapshot(server, workers)
            st.rejoined = sum(r["ok"] for r in replies)
            last = max((r["last_ok_ns"] for r in replies), default=0)
            if st.rejoined == st.sockets and last:
                st.all_joined_s = (last - start_at) / 1e9
            errors: Counter[str] = Counter()
            for r in replies:
                errors.update(r["errors"])
            st.errors = dict(errors)
            st.attempts = sum(r["attempts"] for r in replies)
            rh, rt = merge_hist(replies, "rejoin_hist")
            p50, p99 = pl.percentile_ms(rh, rt, 0.5), pl.percentile_ms(rh, rt, 0.99)
            st.rejoin_p50_s = p50 / 1000 if p50 is not None else None
            st.rejoin_p99_s = p99 / 1000 if p99 is not None else None
            jh, jt = merge_hist(replies, "hist")
            st.join_p50_ms, st.join_p99_ms = pl.percentile_ms(jh, jt, 0.5), pl.percentile_ms(jh, jt, 0.99)
            wall = max(1e-6, (max(last, start_at) - start_at) / 1e9)
            self.fill_cpu(st, s0, s1, max(wall, s1["wall"] - start_at / 1e9), sum(r["cpu"] for r in replies))
            self.reset_all(workers)
            self.wait_idle(server)
        except (BenchError, OSError) as error:
            st.error = str(error) or repr(error)
            print(f"  ERROR: {st.error}", flush=True)
        finally:
            self.stop_workers(workers)
            self.stop_server(server, label)
        self.records.append({"type": "storm", **asdict(st), "passed": st.passed})
        return st

    def cleanup(self) -> None:
        bc.stop_all()
        bc.delete_redis_keys(self.env.get("REDIS_URL"), [self.prefix])
        self.drop_table()


# --- output ------------------------------------------------------------------------------

STEP_HEADER = (f"{'target':>6} {'started':>7} {'ok':>6} {'joins/s':>8} {'p50ms':>7} {'p99ms':>7} {'maxms':>7} "
               f"{'errors':>6} {'sub p50':>7} {'sub p99':>7} {'srvCPU':>6} {'core':>5} {'lgCPU':>5} {'lag ms':>6} "
               f"{'pg':>5} {'redis':>5} {'others':>6} {'ovfl':>5} {'tdown':>5}  ok")


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_errors(errors: dict[str, int]) -> str:
    return "; ".join(f"{c:,}x {reason}" for reason, c in sorted(errors.items(), key=lambda kv: -kv[1])) or "none"


def step_row(s: Step) -> str:
    return (f"{s.target:>6g} {s.started:>7,} {s.ok:>6,} {s.achieved:>8,.0f} {fmt(s.p50_ms, '.1f'):>7} "
            f"{fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>7.0f} {s.error_count:>6,} {fmt(s.sys_p50_ms, '.1f'):>7} "
            f"{fmt(s.sys_p99_ms, '.1f'):>7} {s.server_cpu_pct:>5.0f}% {fmt(s.core_pct, '4.0f'):>4}% "
            f"{s.loadgen_cpu_pct:>4.0f}% {s.lag_max_ms:>6.1f} {s.pg_cpu_pct:>4.0f}% {fmt(s.redis_cpu_pct, '4.0f'):>4}% "
            f"{s.others_cpu_pct:>5.0f}% {s.overflows:>5,} {fmt(s.teardown_s, '5.1f'):>5}  {'yes' if s.passed else 'NO'}")


def print_legend() -> None:
    print("columns: target = new sockets/s attempted; started/ok = sockets started / joined (ok reply); joins/s = ok "
          "replies / (last ok reply - first connect); p50/p99/max = connect start to ok reply; errors = failed "
          "sockets (reasons below the row); sub p50/p99 = connect start to \"Subscribed to PostgreSQL\" (changes "
          "only); srvCPU = server process CPU (% of one core); core = busy time of the server's CPU, whoever it is "
          "charged to; lgCPU = load generator (% of its cores); lag ms = latest connect start behind its schedule; "
          "pg = all PostgreSQL processes, redis = redis-server, others = every other user process (% of one core); "
          "ovfl = TCP ListenOverflows (SYNs dropped on a full accept queue); tdown = seconds until the server was "
          "idle after the step's sockets were reset; ok = within 1% of the target, no errors, p99 <= "
          f"{P99_LIMIT_MS:g} ms", flush=True)


def storm_row(s: Storm) -> str:
    return (f"  {s.server:<7} {s.sockets:>7,} {s.topics:>6} {s.fill_rate:>9,.0f} {fmt(s.rss_joined_mb, '.0f'):>7} "
            f"{s.rejoined:>8,} {fmt(s.all_joined_s, '.1f'):>8} {fmt(s.rejoin_p50_s, '.2f'):>7} "
            f"{fmt(s.rejoin_p99_s, '.2f'):>7} {s.attempts:>8,} {sum(s.errors.values()):>6,} {s.server_cpu_pct:>5.0f}% "
            f"{s.loadgen_cpu_pct:>5.0f}% {s.overflows:>6,}")


STORM_HEADER = (f"  {'server':<7} {'sockets':>7} {'topics':>6} {'fill j/s':>9} {'RSS MB':>7} {'rejoined':>8} "
                f"{'all in s':>8} {'p50 s':>7} {'p99 s':>7} {'attempts':>8} {'errors':>6} {'srvCPU':>6} {'lgCPU':>6} "
                f"{'ovfl':>6}")


def print_summary(args: argparse.Namespace, results: dict[str, Scenario], storms: dict[str, Storm]) -> dict[str, Any]:
    print("\n" + "=" * 118)
    print(f"Summary: sustained = highest step within {RATE_TOLERANCE:.0%} of its target, no errors, p99 <= "
          f"{P99_LIMIT_MS:g} ms; us/join = server CPU per join at that step, raw us = the raw server's at the "
          f"nearest target rate; vs ceiling = sustained joins/s over the sustained joins/s of "
          f"{'raw-nogc' if 'raw-nogc' in results else 'raw'}")
    raw = results.get("raw")
    ceiling = results.get("raw-nogc") or raw
    ceiling_best = ceiling.sustained if ceiling else None
    summary: dict[str, Any] = {"scenarios": {}, "storm": {}, "targets": {}}
    print(f"\n  {'scenario':<9} {'server':<8} {'sustained':>9} {'joins/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'sub p99':>7} {'srvCPU':>6} {'lgCPU':>5} {'us/join':>7} {'raw us':>6} {'peak j/s':>8} {'vs ceiling':>10}")
    for name in RATE_PARTS:
        r = results.get(name)
        if r is None:
            continue
        s, peak = r.sustained, r.peak
        ratio = s.achieved / ceiling_best.achieved if s and ceiling_best and ceiling_best.achieved else None
        us_per_join = 1e6 * s.server_cpu_s / s.ok if s and s.ok else None
        raw_same = min((x for x in raw.steps if s and x.ok), key=lambda x: abs(x.target - s.target),
                       default=None) if raw and s else None
        raw_us = 1e6 * raw_same.server_cpu_s / raw_same.ok if raw_same else None
        summary["scenarios"][name] = {
            "server": r.server, "sustained_target": s.target if s else None, "sustained_joins_per_s": s.achieved if s else None,
            "p50_ms": s.p50_ms if s else None, "p99_ms": s.p99_ms if s else None,
            "subscribed_p99_ms": s.sys_p99_ms if s else None, "server_cpu_pct": s.server_cpu_pct if s else None,
            "server_us_per_join": us_per_join, "raw_us_per_join_same_rate": raw_us,
            "peak_joins_per_s": peak.achieved if peak else None, "vs_ceiling": ratio, "error": r.error,
        }
        if s is None:
            print(f"  {name:<9} {r.server:<8} {'-':>9} {'-':>8} {'-':>7} {'-':>7} {'-':>7} {'-':>6} {'-':>5} {'-':>7} {'-':>6} "
                  f"{fmt(peak.achieved if peak else None, ',.0f'):>8} {'-':>10}"
                  + (f"  error: {r.error}" if r.error else "  (no step passed)"))
            continue
        print(f"  {name:<9} {r.server:<8} {s.target:>9g} {s.achieved:>8,.0f} {fmt(s.p50_ms, '.1f'):>7} "
              f"{fmt(s.p99_ms, '.1f'):>7} {fmt(s.sys_p99_ms, '.1f'):>7} {s.server_cpu_pct:>5.0f}% "
              f"{s.loadgen_cpu_pct:>4.0f}% {fmt(us_per_join, '.0f'):>7} {fmt(raw_us, '.0f'):>6} "
              f"{fmt(peak.achieved if peak else None, ',.0f'):>8} {fmt(ratio, '.2f'):>10}"
              + (f"  error: {r.error}" if r.error else ""))
    if storms:
        print(f"\n  Reconnect storm: all sockets reset at once, reconnected at once (retries after "
              f"{', '.join(f'{s:g}' for s in RETRY_AFTER_S)} s); 'all in s' = until every socket is joined again")
        print(STORM_HEADER)
        for s in storms.values():
            print(storm_row(s) + (f"  error: {s.error}" if s.error else ""))
            if s.errors:
                print(f"      errors: {fmt_errors(s.errors)}")
            summary["storm"][s.server] = {**asdict(s), "fill_rate": s.fill_rate, "passed": s.passed}
    lows = [s for r in results.values() for s in r.steps if s.loadgen_cpu_pct >= 85]
    if lows:
        print(f"\n  note: the load generator used >= 85% of its core(s) in {len(lows)} step(s), e.g. "
              f"{lows[0].scenario} at {lows[0].target:g}/s ({lows[0].loadgen_cpu_pct:.0f}%): those measure the client")
    disturbed = [s for r in results.values() for s in r.steps if s.others_cpu_pct >= DISTURBED_PCT]
    if disturbed:
        print(f"  note: {len(disturbed)} step(s) ran while other processes used >= {DISTURBED_PCT:g}% of a core "
              f"(e.g. {disturbed[0].scenario} at {disturbed[0].target:g}/s: {disturbed[0].others_cpu_pct:.0f}%)")

    print("\n  Targets:")
    for name, target in TARGET_RATE.items():
        r = results.get(name)
        if r is None:
            continue
        s = r.sustained
        ok = s is not None and s.target >= target
        at = next((x for x in r.steps if x.target == target), None)
        print(f"    >= {target:,.0f} {name} joins/s sustained: "
              + (f"{s.achieved:,.0f} joins/s at the {s.target:g}/s step" if s else "no step passed")
              + f" -> {'PASS' if ok else 'FAIL'}")
        p99_ok = at is not None and at.p99_ms is not None and at.p99_ms <= P99_LIMIT_MS
        print(f"    p99 <= {P99_LIMIT_MS:g} ms at {target:,.0f} {name} joins/s: "
              + (f"{fmt(at.p99_ms, '.1f')} ms" if at else "step not reached")
              + f" -> {'PASS' if p99_ok else 'FAIL'}")
        summary["targets"][f"{name}_joins_per_s"] = ok
        summary["targets"][f"{name}_p99"] = p99_ok
    ours = next((s for s in storms.values() if s.server == "daphne"), None)
    if ours is not None:
        print(f"    reconnect storm of {ours.sockets:,} sockets rejoined within {STORM_TARGET_S:g} s, only limit errors: "
              f"{fmt(ours.all_joined_s, '.1f')} s, {ours.rejoined:,} rejoined, {ours.other_errors:,} other errors "
              f"-> {'PASS' if ours.passed else 'FAIL'}")
        summary["targets"]["storm"] = ours.passed
    return summary


# --- main ---------------------------------------------------------------------------------


class Tee:
    def __init__(self, stream: Any, path: Path) -> None:
        self.stream = stream
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="connect + JWT + join benchmark (see module docstring).")
    p.add_argument("--quick", action="store_true", help="smoke run, under 2 minutes")
    p.add_argument("--scenarios", nargs="+", choices=ALL_PARTS, help=f"parts to run (default: {' '.join(ALL_PARTS)})")
    for name in DEFAULT_RATES:
        p.add_argument(f"--rates-{name}", dest=f"rates_{name.replace('-', '_')}", type=float, nargs="+",
                       help=f"joins/s per step for {name}")
    p.add_argument("--duration", type=float, help="seconds of connects per step (default 3; quick: 2)")
    p.add_argument("--workers", type=int, default=2, help="load-generator worker processes (default 2)")
    p.add_argument("--users", type=int, default=64, help="distinct authenticated tokens for private joins")
    p.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_S, help="seconds from connect to the ok reply")
    p.add_argument("--storm-sockets", type=int, help="sockets in the reconnect storm (default 5000; quick: 1000)")
    p.add_argument("--storm-topics", type=int, default=50, help="topics the storm's sockets join")
    p.add_argument("--storm-limit", type=float, help="give up the storm after this many seconds (default 60; quick: 20)")
    p.add_argument("--fill-inflight", type=int, default=100, help="joins in flight per worker while filling the storm")
    p.add_argument("--quiet-wait", type=float,
                   help=f"before each step wait up to this long for other processes to use < {DISTURBED_PCT:g}%% of a "
                        "core (default 20; quick: 1; 0 = never); a failed step run while they were busy is run again (not in quick)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the server and the load generator")
    p.add_argument("--profile", nargs="*", choices=RATE_PARTS, default=[],
                   help="py-spy the server during one extra step of these scenarios (bare flag: public)")
    p.add_argument("--profile-seconds", type=float, default=4.0)
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (shows C frames such as the GC)")
    p.add_argument("--daphne-backlog", type=int,
                   help="experiment: run daphne with this listen backlog (as shipped: Twisted's default, 50)")
    p.add_argument("--server-ref", help="run the server from a clean export of this git ref (default: the working tree)")
    p.add_argument("--db-name", default="realtime_bench_joins", help="PostgreSQL database of this bench")
    p.add_argument("--redis-db", type=int, default=7, help="Redis database number of this bench")
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 600; quick: 115)")
    p.add_argument("--log-dir", type=Path, help="server and load-generator logs, joins.txt, joins.json (default: a temp dir)")
    p.add_argument("--json", type=Path, help="where to write the JSON results (default: <log dir>/joins.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.scenarios = args.scenarios or list(ALL_PARTS)
    table = QUICK_RATES if q else DEFAULT_RATES
    args.rates = {name: sorted(getattr(args, f"rates_{name.replace('-', '_')}") or table[name]) for name in DEFAULT_RATES}
    args.duration = args.duration or (2.0 if q else 3.0)
    args.storm_sockets = args.storm_sockets or (1000 if q else 5000)
    args.storm_limit = args.storm_limit or (20.0 if q else 60.0)
    args.timeout = args.timeout or (115.0 if q else 600.0)
    if args.quiet_wait is None:
        args.quiet_wait = 1.0 if q else 20.0
    if args.profile == [] and "--profile" in (argv if argv is not None else sys.argv[1:]):
        args.profile = ["public"]
    return args


def bench_env(args: argparse.Namespace) -> dict[str, str]:
    """The other benches' service environment, on this bench's own database and Redis DB."""
    env = bc.service_env()
    db = urlsplit(env["DATABASE_URL"])
    env["DATABASE_URL"] = urlunsplit(db._replace(path=f"/{args.db_name}"))
    redis = urlsplit(env["REDIS_URL"])
    env["REDIS_URL"] = urlunsplit(redis._replace(path=f"/{args.redis_db}"))
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        JoinWorker(json.loads(args.worker)).run()
        return 0
    started, nofile, log_dir = bc.begin_run(args, "joins", 20)
    sys.stdout = Tee(sys.stdout, log_dir / "joins.txt")  # type: ignore[assignment]
    json_path = args.json or log_dir / "joins.json"
    results: dict[str, Scenario] = {}
    storms: dict[str, Storm] = {}
    bench: Bench | None = None
    meta = _report.run_meta("joins", quick=args.quick, daphne_backlog=args.daphne_backlog)
    with bc.guarded_run(lambda: bench.cleanup() if bench is not None else bc.stop_all()) as outcome:
        if args.server_ref:
            args.server_dir, sha = bc.export_ref(args.server_ref, log_dir)
            source = f"git {args.server_ref} = {sha[:12]} (exported to {args.server_dir})"
            meta["server_commit"] = sha
        else:
            args.server_dir = REPO
            source = bc.describe_tree(REPO)
        env = bench_env(args)
        bench = Bench(args, env, log_dir)
        need = max(max(max(r) for r in args.rates.values()) * args.duration, args.storm_sockets) + 500
        print(f"joins bench: parts={' '.join(args.scenarios)} step={args.duration:g}s workers={args.workers} "
              f"storm={args.storm_sockets:,} sockets/{args.storm_topics} topics; RLIMIT_NOFILE={nofile}"
              + (f"; EXPERIMENT: daphne listen backlog {args.daphne_backlog}" if args.daphne_backlog else "")
              + (f" (below {need:,.0f}: large steps may fail)" if nofile < need else ""), flush=True)
        print(f"server code: {source}; cpus={os.cpu_count()} ({meta['cpu_model']}); pinning: server cpu "
              f"{sorted(bench.server_cpus) if bench.server_cpus else 'any'}, load generator cpu "
              f"{sorted(bench.loadgen_cpus) if bench.loadgen_cpus else 'any'}; DATABASE_URL={env['DATABASE_URL']} "
              f"REDIS_URL={env['REDIS_URL']}; logs in {log_dir}", flush=True)
        bench.prepare_database()
        print_legend()
        for name in RATE_PARTS:
            if name not in args.scenarios:
                continue
            if time.monotonic() > args.deadline - 30:
                print(f"\nskipping {name}: time budget spent", flush=True)
                continue
            kind = name if name in BASELINES else "daphne"
            what = {"raw": "the minimal websockets server (baseline)",
                    "raw-nogc": "the minimal websockets server with the garbage collector off (baseline)",
                    }.get(name, "daphne (manage.py runserver)")
            print(f"\n== {name}: {what}; rates {' '.join(f'{r:g}' for r in args.rates[name])} joins/s", flush=True)
            results[name] = bench.run_rates(name, kind, args.rates[name])
        if "storm" in args.scenarios:
            for kind in ("raw", "daphne"):
                if time.monotonic() > args.deadline - args.storm_limit - 10:
                    print(f"\nskipping the {kind} storm: time budget spent", flush=True)
                    continue
                print(f"\n== storm: {kind}; {args.storm_sockets:,} sockets on {args.storm_topics} topics", flush=True)
                storms[kind] = s = bench.storm(kind)
                print(STORM_HEADER + "\n" + storm_row(s), flush=True)
                if s.errors:
                    print(f"      errors: {fmt_errors(s.errors)}", flush=True)
    code = outcome.code
    summary = print_summary(args, results, storms)
    for r in results.values():
        if r.profile:
            print("\n" + r.profile)
    records = bench.records if bench is not None else []
    json_path.write_text(json.dumps([*records, {"type": "summary", **meta, **summary,
                                                "total_s": round(time.monotonic() - started, 1)}], indent=1))
    print(f"\ntotal {time.monotonic() - started:.0f}s; text in {log_dir / 'joins.txt'}, JSON in {json_path}; "
          f"logs in {log_dir}")
    if code == 0 and any(r.error for r in results.values()) or any(s.error for s in storms.values()):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
