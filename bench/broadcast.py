"""Broadcast fan-out benchmark: one topic, N subscribed sockets, rising publish rates.

For each server under test (daphne via ``manage.py runserver``, uvicorn with
the ``websockets`` or ``websockets-sansio`` protocol) and two ceilings (``raw``:
a minimal ``websockets`` server whose ``broadcast()`` frames the message once
per connection; ``rawframe``: an asyncio protocol that frames each message once
and hands the same bytes to every socket's ``transport.write``; ``daphne-workers``: ``manage.py
runserver --workers W``, W daphne processes on one port, ``--server-workers``) and each socket
count N, this script starts the server as a subprocess, holds N sockets joined
to ``realtime:bench`` from load-generator worker processes
(``bench/_loadgen.py``), then publishes from one extra socket at rising rates.
Every payload carries the step, a sequence number and the send timestamp; per
step the load generator counts, per socket, sequence numbers missing, repeated
or out of order, and the latency (send timestamp to receipt, same clock). A
step passes when every socket that joined (the ones the server closed count)
got every message exactly once, the publisher achieved at least 99% of the
target rate and p99 <= 100 ms; the sustained figure is the highest passing
step. The summary gives each server's ratio to the faster ceiling. It also
reports server CPU per delivery (from /proc/<pid>/stat) and RSS per 1,000 idle
joined sockets (summed over the server's processes), and optionally a py-spy profile of the
server under load.
Results go to stdout, and as text and JSON (``bench/_report.py``, for
``bench/compare.py``) to the log folder.

On a machine with two or more CPUs the server is pinned to the first CPU and
the load generator (workers and the publisher in this process) to the others,
so each side gets its own core (with ``daphne-workers`` the server gets the first W CPUs, if
at least W + 1 are available; else nothing is pinned); ``--no-pin`` lets the scheduler decide. The
load generator's CPU use is printed per step: a step where it is near 100% of
its core measures the client, not the server.

Usage::

    .venv/bin/python bench/broadcast.py --quick
    .venv/bin/python bench/broadcast.py --sockets 1000 5000 --servers daphne uvicorn raw rawframe --profile daphne
    .venv/bin/python bench/broadcast.py --sockets 5000 --servers daphne daphne-workers --server-workers 2  # 1 vs 2 processes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import _cpu  # noqa: E402
import _loadgen as lg  # noqa: E402
import _report  # noqa: E402
# The CPU readers live in _cpu.py; the other benches also reach them as ``bc.<name>``.
from _cpu import CLK_TCK, DISTURBED_PCT, core_busy_seconds, cpu_seconds, cpu_times, foreign_cpu, userland_cpu  # noqa: E402,F401

HOST = "127.0.0.1"
SERVERS = ("daphne", "daphne-workers", "uvicorn", "uvicorn-sansio", "raw", "rawframe")
CEILINGS = ("raw", "rawframe")
DEFAULT_SERVERS = ["daphne", "uvicorn", "raw", "rawframe"]
DEFAULT_RATES = [5, 10, 15, 25, 35, 50, 70, 100, 140, 200, 280, 400, 560, 800, 1100, 1600, 2200, 3200]
QUICK_RATES = [10, 50]
P99_LIMIT_MS = 100.0
RATE_SHARE = 0.99
JWT_SECRET_DEFAULT = "super-secret-jwt-token-with-at-least-32-characters-long"
PR_SET_PDEATHSIG = 1

_children: list[subprocess.Popen[bytes]] = []


class BenchError(RuntimeError):
    pass


# --- processes ---------------------------------------------------------------------


def _child_setup(cpus: set[int] | None) -> Any:
    def setup() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def spawn(cmd: list[str], *, cpus: set[int] | None, env: dict[str, str] | None = None, cwd: Path = REPO,
          **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, preexec_fn=_child_setup(cpus), **kwargs)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_children)):
        with contextlib.suppress(Exception):
            stop(proc, timeout=3.0)


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervised server's processes)."""
    pids = [pid]
    for parent in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                pids += [int(child) for child in f.read().split()]
    return pids


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """``cpu_times`` summed over ``pid`` and its descendants."""
    user = system = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            u, s = cpu_times(member)
            user, system = user + u, system + s
    return user, system


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants."""
    total = 0
    for member in tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.2)
    raise BenchError(f"server did not listen on {port} within {timeout:.0f}s")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the raw websockets ceiling ------------------------------------------------------


def run_raw_server(port: int) -> None:
    """A minimal Phoenix-ish broadcast server on websockets.asyncio: the ceiling."""
    import asyncio
    import logging

    from websockets.asyncio.server import broadcast, serve

    logging.getLogger("websockets").setLevel(logging.CRITICAL)

    joined: set[Any] = set()

    def reply(join_ref: Any, ref: Any, topic: Any, response: dict[str, Any]) -> str:
        return json.dumps([join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response}], separators=(",", ":"))

    async def handler(ws: Any) -> None:
        try:
            async for message in ws:
                if not isinstance(message, str):
                    continue
                try:
                    join_ref, ref, topic, event, payload = json.loads(message)
                except (ValueError, TypeError):
                    continue
                if event == "broadcast":
                    frame = json.dumps([None, None, topic, "broadcast", payload], separators=(",", ":"), ensure_ascii=False)
                    member = ws in joined
                    if member:
                        joined.discard(ws)
                    broadcast(joined, frame)
                    if member:
                        joined.add(ws)
                elif event == "phx_join":
                    joined.add(ws)
                    await ws.send(reply(join_ref, ref, topic, {"postgres_changes": []}))
                elif event == "heartbeat":
                    await ws.send(reply(None, ref, "phoenix", {}))
                elif event == "phx_leave":
                    joined.discard(ws)
                    await ws.send(reply(join_ref, ref, topic, {}))
        finally:
            joined.discard(ws)

    async def main() -> None:
        async with serve(handler, HOST, port, compression=None, max_size=5_000_000, backlog=1024) as server:
            await server.serve_forever()

    asyncio.run(main())


def run_rawframe_server(port: int) -> None:
    """The fastest broadcast we can write in Python: a message is framed once and the same bytes are
    handed to every joined socket's ``transport.write`` (no per-socket framing, no await per socket).

    Minimal RFC 6455 (no extensions, unfragmented client frames) and the Phoenix replies the load
    generator needs (join, heartbeat, leave); uvloop when it is installed.
    """
    import asyncio
    import base64
    import hashlib

    writers: dict[Any, Any] = {}  # joined transport -> its bound write
    fanout: list[tuple[Any, ...]] = [()]  # snapshot of writers.values(), rebuilt on (un)join

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            return bytes((0x80 | opcode, n)) + payload
        if n < 65536:
            return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
        return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload

    def reply(join_ref: Any, ref: Any, topic: Any, response: dict[str, Any]) -> bytes:
        return frame(1, dumps([join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response}]))

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = b""
            self.upgraded = False

        def connection_lost(self, exc: Exception | None) -> None:
            self.leave()

        def leave(self) -> None:
            if writers.pop(self.t, None) is not None:
                fanout[0] = tuple(writers.values())

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            if not self.upgraded:
                head, sep, buf = buf.partition(b"\r\n\r\n")
                if not sep:
                    self.buf = head
                    if len(head) > 65536:
                        self.t.close()
                    return
                key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head)
                if key is None:
                    self.t.close()
                    return
                accept = base64.b64encode(hashlib.sha1(key.group(1) + lg.WS_GUID).digest())
                self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                self.upgraded = True
            pos, n = 0, len(buf)
            while n - pos >= 6:
                b0, length, hl = buf[pos], buf[pos + 1] & 0x7F, 2
                if length == 126:
                    length, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
                elif length == 127:
                    length, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
                end = pos + hl + 4 + length
                if end > n:
                    break
                if b0 & 0x8F in (0x81, 0x89, 0x88):  # FIN text, ping, close; drop the rest
                    self.on_frame(b0 & 0x0F, lg.mask_payload(buf[pos + hl + 4 : end], buf[pos + hl : pos + hl + 4]))
                pos = end
            self.buf = buf[pos:]

        def on_frame(self, opcode: int, payload: bytes) -> None:
            if opcode == 9:
                self.t.write(frame(0xA, payload))
                return
            if opcode == 8:
                self.t.write(frame(8, payload[:2]))
                self.t.close()
                return
            try:
                join_ref, ref, topic, event, body = json.loads(payload)
            except (ValueError, TypeError):
                return
            if event == "broadcast":
                out = frame(1, dumps([None, None, topic, "broadcast", body]))
                me = writers.get(self.t)
                for write in fanout[0]:
                    if write is not me:
                        write(out)
            elif event == "phx_join":
                writers[self.t] = self.t.write
                fanout[0] = tuple(writers.values())
                self.t.write(reply(join_ref, ref, topic, {"postgres_changes": []}))
            elif event == "heartbeat":
                self.t.write(reply(None, ref, "phoenix", {}))
            elif event == "phx_leave":
                self.leave()
                self.t.write(reply(join_ref, ref, topic, {}))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Conn, HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def rawframe_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


# --- load generator handles ----------------------------------------------------------


class Worker:
    def __init__(self, index: int, client: str, cfg: dict[str, Any], cpus: set[int] | None, log: Any) -> None:
        self.index = index
        self.proc = spawn(
            [sys.executable, str(BENCH_DIR / "_loadgen.py"), client, json.dumps(cfg)],
            cpus=cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )
        self.buf = b""
        self.info: dict[str, Any] = {}

    def read(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BenchError(f"load-generator worker {self.index} exited (code {self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def rpc(self, cmd: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        self.send(cmd)
        reply = self.read(timeout)
        if reply is None:
            raise BenchError(f"load-generator worker {self.index} did not answer {cmd['cmd']!r} within {timeout:.0f}s")
        return reply

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.rpc({"cmd": "quit"}, timeout=5)
        stop(self.proc, timeout=5)


# --- results -----------------------------------------------------------------------


@dataclass
class Step(_report.FanoutVerdict):
    """One publish rate: what was sent and delivered, latency and CPU; the verdict is ``FanoutVerdict``'s."""

    rate_short = f"pub/s < {RATE_SHARE:.0%}"
    p99_limit_ms = P99_LIMIT_MS
    rate: float
    sent: int
    pub_rate: float
    joined: int
    receivers: int
    closed: int
    expected: int
    received: int
    missing: int
    dups: int
    gaps: int
    lossy_sockets: int
    max_socket_missing: int
    deliveries_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float
    server_cpu_pct: float
    server_sys_pct: float
    server_core_pct: float | None
    loadgen_cpu_pct: float
    others_cpu_pct: float
    redis_cpu_pct: float | None
    us_per_delivery: float | None
    wall_s: float

    @property
    def rate_ok(self) -> bool:
        return self.pub_rate >= RATE_SHARE * self.rate


@dataclass
class Run:
    server: str
    n: int
    joined: int = 0
    setup_s: float = 0.0
    rss0_kb: int = 0
    rssn_kb: int = 0
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    profile: str | None = None
    sample: str | None = None

    @property
    def rss_mb_per_1k(self) -> float | None:
        if not self.joined or not self.rssn_kb:
            return None
        return (self.rssn_kb - self.rss0_kb) / 1024 / self.joined * 1000

    @property
    def sustained(self) -> Step | None:
        passed = [s for s in self.steps if s.passed]
        return max(passed, key=lambda s: s.rate) if passed else None

    @property
    def peak(self) -> Step | None:
        return max(self.steps, key=lambda s: s.deliveries_per_s) if self.steps else None

    @property
    def limit_found(self) -> bool:
        """A step above the sustained one failed: the sustained figure is this server's limit, not a lower bound."""
        best = self.sustained
        return best is not None and any(not s.passed and s.rate > best.rate for s in self.steps)


# --- one server x one N ----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.step_id = 0
        server_cores = args.server_workers if "daphne-workers" in args.servers else 1
        self.server_cpus, self.loadgen_cpus, self.loadgen_cores = _cpu.pin(args.pin, server_cores)
        self.anon = lg.mint_jwt(env["JWT_SECRET"], "anon")
        self.redis_pid = redis_pid()
        self.prefixes: list[str] = []

    def server_command(self, kind: str, port: int) -> list[str]:
        py = sys.executable
        if kind == "daphne":
            return [py, "manage.py", "runserver", f"{HOST}:{port}", "--noreload"]
        if kind == "daphne-workers":
            return [py, "manage.py", "runserver", f"{HOST}:{port}", "--workers", str(self.args.server_workers)]
        if kind in ("uvicorn", "uvicorn-sansio"):
            ws = "websockets" if kind == "uvicorn" else "websockets-sansio"
            return [py, "-m", "uvicorn", "realtime_project.asgi:application", "--host", HOST, "--port", str(port),
                    "--ws", ws, "--log-level", "warning", "--lifespan", "off"]
        if kind == "raw":
            return [py, str(Path(__file__).resolve()), "--raw-server-port", str(port)]
        if kind == "rawframe":
            return [py, str(Path(__file__).resolve()), "--rawframe-server-port", str(port)]
        raise BenchError(f"unknown server {kind}")

    def run(self, kind: str, n: int, profile: bool) -> Run:
        run = Run(kind, n)
        port = free_port()
        env = dict(self.env)
        prefix = f"rtbench{os.getpid()}x{len(self.prefixes)}"
        self.prefixes.append(prefix)
        env["REALTIME_LAYER_PREFIX"] = prefix
        env["REALTIME_DRAIN_S"] = "0"  # stopping a server closes its sockets at once
        log = open(self.log_dir / f"{kind}-{n}.log", "wb")
        server = spawn(self.server_command(kind, port), cpus=self.server_cpus, env=env, cwd=self.args.server_dir,
                       stdout=log, stderr=subprocess.STDOUT)
        workers: list[Worker] = []
        pub: lg.Publisher | None = None
        try:
            wait_port(port, server, 90)
            path = f"/realtime/v1/websocket?apikey={self.anon}&vsn=2.0.0"
            pub = lg.Publisher(HOST, port, path)
            pub.publish(20, 0.25, 0)
            time.sleep(1.0)
            if self.args.quiet_wait > 0:
                self.wait_quiet(pub)
            run.rss0_kb = rss_kb(server.pid)
            started = time.monotonic()
            k = max(1, min(self.args.workers, n))
            cfg = {"host": HOST, "port": port, "path": path, "batch": self.args.batch,
                   "timeout": 30, "heartbeat_s": self.args.heartbeat}
            wlog = open(self.log_dir / f"loadgen-{kind}-{n}.log", "wb")
            for i in range(k):
                count = n // k + (1 if i < n % k else 0)
                workers.append(Worker(i, self.args.client, dict(cfg, count=count), self.loadgen_cpus, wlog))
            wlog.close()
            deadline = time.monotonic() + 60 + n / 25
            pending = list(workers)
            while pending:
                if time.monotonic() > deadline:
                    raise BenchError("load generator did not finish connecting in time")
                pub.service()
                for w in list(pending):
                    info = w.read(0.2)
                    if info is not None:
                        w.info = info
                        pending.remove(w)
            run.setup_s = time.monotonic() - started
            run.joined = sum(int(w.info.get("joined", 0)) for w in workers)
            errors = [e for w in workers for e in w.info.get("errors", [])]
            print(f"  [{kind} N={n}] joined {run.joined}/{n} in {run.setup_s:.1f}s"
                  + (f"; errors: {errors[:2]}" if errors else ""), flush=True)
            if run.joined == 0:
                raise BenchError("no socket joined")
            self.settle(pub, 2.0)
            run.rssn_kb = rss_kb(server.pid)
            print(f"  [{kind} N={n}] RSS {run.rss0_kb / 1024:.1f} MiB idle -> {run.rssn_kb / 1024:.1f} MiB with "
                  f"{run.joined} joined sockets ({fmt(run.rss_mb_per_1k, '.2f')} MiB per 1k)", flush=True)
            self.warm_up(workers, pub)
            run.sample = next((st["sample"] for st in (w.rpc({"cmd": "status"}) for w in workers) if st.get("sample")), None)
            print(f"  [{kind} N={n}] a broadcast frame as received: {run.sample}", flush=True)
            print("  " + STEP_HEADER, flush=True)
            failures = 0

            def measure(rate: float, note: str = "") -> Step:
                step = self.step(server, workers, pub, rate, self.args.duration)
                if not step.passed and step.others_cpu_pct >= DISTURBED_PCT:
                    print("  " + step_row(step) + f"  (other processes used {step.others_cpu_pct:.0f}% of a core: retrying)",
                          flush=True)
                    step = self.step(server, workers, pub, rate, self.args.duration)
                run.steps.append(step)
                print("  " + step_row(step) + note, flush=True)
                if step.closed:
                    print(f"  ({step.closed} of {step.joined} joined sockets closed by the end of this step, "
                          f"{step.joined - step.receivers} before it; their missed messages count as loss)", flush=True)
                if server.poll() is not None:
                    raise BenchError(f"server exited with code {server.returncode}")
                return step

            def time_left() -> bool:
                if time.monotonic() > self.args.deadline - 30:
                    print("  (global time budget nearly spent: stopping the steps)", flush=True)
                    return False
                return True

            for rate in self.args.rates:
                if not time_left():
                    break
                step = measure(rate)
                failures = 0 if step.passed else failures + 1
                if failures >= 2 or (failures and (step.p99_ms or 0) > 1000) or (failures and step.loss > step.expected // 2):
                    break
            for _ in range(self.args.refine):
                best = run.sustained
                above = [s.rate for s in run.steps if not s.passed and best and s.rate > best.rate]
                if best is None or not above or not time_left():
                    break
                mid = float(f"{math.sqrt(best.rate * min(above)):.2g}")
                if not best.rate < mid < min(above):
                    break
                measure(mid, "  (refining)")
            if profile and time.monotonic() < self.args.deadline - self.args.profile_seconds - 30:
                run.profile = self.profile(kind, n, server, workers, pub, run)
        except (BenchError, OSError, lg.HandshakeError) as error:
            run.error = str(error) or repr(error)
            print(f"  [{kind} N={n}] ERROR: {error}", flush=True)
        finally:
            for w in workers:
                w.quit()
            if pub is not None:
                pub.close()
            stop(server)
            log.close()
            report_server_log(self.log_dir / f"{kind}-{n}.log", f"{kind} N={n}")
            if run.error:
                tail = (self.log_dir / f"{kind}-{n}.log").read_bytes()[-2000:].decode("utf-8", "replace")
                if tail.strip():
                    print("  server log tail:\n" + "\n".join("    " + line for line in tail.splitlines()[-15:]), flush=True)
        return run

    def warm_up(self, workers: list[Worker], pub: lg.Publisher) -> None:
        """One unmeasured second at the first rate, so the first step starts on a warm path."""
        pub.publish(self.args.rates[0], 1.0, 0)
        self.quiesce(workers, pub)
        for w in workers:
            w.rpc({"cmd": "stats", "step": 0})

    def settle(self, pub: lg.Publisher, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pub.service()
            time.sleep(0.05)

    def quiesce(self, workers: list[Worker], pub: lg.Publisher, limit: float = 30.0) -> None:
        """Wait until no broadcast arrived for 0.3 s (the previous step's backlog is drained)."""
        end = time.monotonic() + limit
        last = -1
        stable_since = time.monotonic()
        while time.monotonic() < end:
            frames = sum(int(w.rpc({"cmd": "count", "step": -1})["ticks"]) for w in workers)
            if frames != last:
                last, stable_since = frames, time.monotonic()
            elif time.monotonic() - stable_since >= 0.3:
                return
            pub.service()
            time.sleep(0.05)

    def ours(self) -> set[int]:
        pids = {os.getpid(), *(member for p in _children for member in tree(p.pid))}
        if self.redis_pid:
            pids.add(self.redis_pid)
        return pids

    def wait_quiet(self, pub: lg.Publisher | None) -> None:
        """Wait (up to --quiet-wait s) until other processes use less than DISTURBED_PCT of a core."""
        _cpu.wait_quiet(self.args.quiet_wait, self.ours, pub.service if pub is not None else None)

    def step(self, server: subprocess.Popen[bytes], workers: list[Worker], pub: lg.Publisher, rate: float, duration: float) -> Step:
        self.quiesce(workers, pub)
        if self.args.quiet_wait > 0:
            self.wait_quiet(pub)
        status = [w.rpc({"cmd": "status"}) for w in workers]
        receivers = sum(int(s["open"]) for s in status)
        lg_cpu0 = sum(float(s["cpu"]) for s in status) + time.process_time()
        self.step_id += 1
        step_id = self.step_id
        ours = self.ours()
        procs0 = userland_cpu()
        t0 = time.monotonic()
        core0 = core_busy_seconds(self.server_cpus)
        user0, sys0 = tree_cpu_times(server.pid)
        redis0 = self.redis_cpu()
        info = pub.publish(rate, duration, step_id)
        if info["seq_last"] - info["seq_first"] + 1 != info["sent"]:
            raise BenchError(f"publisher sequence numbers {info['seq_first']}..{info['seq_last']} for {info['sent']} messages")
        reachable = info["sent"] * receivers
        last, last_change = -1, time.monotonic()
        drain_end = time.monotonic() + self.args.max_drain
        while True:
            got = sum(int(w.rpc({"cmd": "count", "step": step_id})["recv"]) for w in workers)
            now = time.monotonic()
            if got >= reachable or now > drain_end:
                break
            if got != last:
                last, last_change = got, now
            elif now - last_change > 1.0:
                break
            pub.service()
            time.sleep(0.02)
        t1 = time.monotonic()
        core1 = core_busy_seconds(self.server_cpus)
        user1, sys1 = tree_cpu_times(server.pid)
        redis1 = self.redis_cpu()
        others = foreign_cpu(procs0, userland_cpu(), ours)
        replies = [w.rpc({"cmd": "stats", "step": step_id, "sent": info["sent"]}) for w in workers]
        lg_cpu1 = sum(float(r["cpu"]) for r in replies) + time.process_time()
        seq = {key: sum(int(r["seq"][key]) for r in replies) for key in
               ("sockets", "dups", "gaps", "missing", "lossy_sockets", "closed_sockets")}
        seq["max_socket_missing"] = max(int(r["seq"]["max_socket_missing"]) for r in replies)
        merged = lg.merge_stats(replies)
        received = merged.received
        last_ns = merged.last_ns or info["last_ns"]
        window = max(info["wall"], (last_ns - info["first_ns"]) / 1e9, 1e-6)
        wall = t1 - t0
        server_cpu = (user1 - user0) + (sys1 - sys0)
        return Step(
            rate=rate,
            sent=info["sent"],
            pub_rate=info["rate"],
            joined=seq["sockets"],
            receivers=receivers,
            closed=seq["closed_sockets"],
            expected=info["sent"] * seq["sockets"],
            received=received,
            missing=seq["missing"],
            dups=seq["dups"],
            gaps=seq["gaps"],
            lossy_sockets=seq["lossy_sockets"],
            max_socket_missing=seq["max_socket_missing"],
            deliveries_per_s=received / window,
            p50_ms=merged.p50_ms,
            p99_ms=merged.p99_ms,
            max_ms=merged.max_ms,
            server_cpu_pct=100 * server_cpu / wall,
            server_sys_pct=100 * (sys1 - sys0) / server_cpu if server_cpu > 0 else 0.0,
            server_core_pct=None if core0 is None or core1 is None else 100 * (core1 - core0) / wall,
            loadgen_cpu_pct=100 * (lg_cpu1 - lg_cpu0) / wall / self.loadgen_cores,
            others_cpu_pct=100 * others / wall,
            redis_cpu_pct=None if redis0 is None or redis1 is None else 100 * (redis1 - redis0) / wall,
            us_per_delivery=1e6 * server_cpu / received if received else None,
            wall_s=wall,
        )

    def redis_cpu(self) -> float | None:
        return _cpu.cpu_or_none(self.redis_pid)

    def profile(self, kind: str, n: int, server: subprocess.Popen[bytes], workers: list[Worker], pub: lg.Publisher, run: Run) -> str | None:
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if pyspy is None:
            print("  (py-spy not found: no profile; `.venv/bin/pip install py-spy` to enable)", flush=True)
            return None
        best = run.sustained
        rate = best.rate if best else self.args.rates[0]
        secs = self.args.profile_seconds
        out = self.log_dir / f"profile-{kind}-{n}.txt"
        cmd = [pyspy, "record", "--pid", str(server.pid), "--subprocesses", "--duration", str(int(secs)), "--rate", "200",
               "--format", "raw", "--output", str(out), "--nonblocking"]
        print(f"  [{kind} N={n}] profiling with py-spy for {secs:.0f}s at {rate:g} msg/s", flush=True)
        spy = spawn(cmd, cpus=self.loadgen_cpus, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            step = self.step(server, workers, pub, rate, max(1.0, secs - 2.5))
            print("  " + step_row(step) + "  (under py-spy)", flush=True)
            try:
                spy.wait(secs + 60)
            except subprocess.TimeoutExpired:
                print("  (py-spy did not finish)", flush=True)
                return None
            if spy.returncode != 0 or not out.exists():
                err = spy.stderr.read().decode("utf-8", "replace")[-500:] if spy.stderr else ""
                print(f"  (py-spy failed: {err.strip()})", flush=True)
                return None
            return summarize_profile(out.read_text(), f"{kind} N={n} at {rate:g} msg/s ({step.deliveries_per_s:,.0f} deliveries/s, "
                                                       f"server CPU {step.server_cpu_pct:.0f}%)")
        finally:
            stop(spy)

    def cleanup_redis(self) -> None:
        delete_redis_keys(self.env.get("REDIS_URL"), self.prefixes)


def delete_redis_keys(url: str | None, prefixes: list[str]) -> None:
    """Best effort: remove every key a bench run wrote under its own ``prefixes``."""
    if not url or not prefixes:
        return
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()


def report_server_log(path: Path, label: str) -> None:
    """Point out errors the server logged during the run (they may explain a slow or lossy step)."""
    with contextlib.suppress(OSError):
        lines = path.read_text("utf-8", "replace").splitlines()
        errors = [line for line in lines if re.search(r"\b(ERROR|CRITICAL)\b", line)]
        if errors:
            kinds = Counter(re.sub(r"^\S+ \S+ ", "", line)[:120] for line in errors)
            print(f"  [{label}] server logged {len(errors)} error(s): "
                  + "; ".join(f"{c}x {k}" for k, c in kinds.most_common(3)), flush=True)


def redis_pid() -> int | None:
    try:
        from devservices import redis

        pid = redis.redis_pid()
        return int(pid) if pid else None
    except Exception:
        return None


# --- profile summary -------------------------------------------------------------------

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short_path(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    repo = str(REPO) + "/"
    if path.startswith(repo):
        return path[len(repo):]
    m = re.search(r"/lib/python3\.\d+/(.*)", path)
    return m.group(1) if m else path


def _package(path: str) -> str:
    short = _short_path(path)
    if short == path and "/" in path:
        return path
    top = short.split("/", 1)[0]
    if "site-packages/" in path:
        return top.removesuffix(".py")
    if path.startswith(str(REPO) + "/"):
        return f"project:{top}"
    return f"stdlib:{top.removesuffix('.py')}"


def summarize_profile(raw: str, title: str, top: int = 25) -> str:
    """Self and inclusive time per function, and self time per package, from py-spy raw output."""
    self_time: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    loop_chain: set[str] = set()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        leaf_line = ""
        for frame in stack.split(";"):
            m = _FRAME_RE.match(frame)
            if m:
                frames.append((m.group("func"), m.group("file")))
                leaf_line = f"{m.group('func')} ({_short_path(m.group('file'))}:{m.group('line') or '?'})"
        if not frames:
            continue
        total += count
        self_lines[leaf_line] += count
        func, path = frames[-1]
        self_time[f"{func} ({_short_path(path)})"] += count
        packages[_package(path)] += count
        names = [f"{f} ({_short_path(p)})" for f, p in frames]
        cut = next((i + 1 for i, (f, _) in enumerate(frames) if f.endswith("._run_once")), 0)
        if cut and cut < len(frames) and frames[cut][0] == "Handle._run":
            cut += 1
        loop_chain.update(names[:cut])
        for name in set(names[cut:]):
            inclusive[name] += count
    if not total:
        return f"Profile {title}: no samples"
    lines = [f"Profile: {title}; {total} samples of active (non-idle) time.",
             "  Time inside C functions and system calls (socket.send, epoll) is charged to the Python line calling them.",
             "  Sampled with --nonblocking: stopping the process for each sample lands almost every sample on a",
             "  system call site and hides pure-Python time; a few stacks may be torn (inclusive % slightly low).",
             "", "  Top functions by self time:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in self_time.most_common(top)]
    lines += ["", "  Top lines by self time:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in self_lines.most_common(10)]
    lines += ["", "  Self time by package:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in packages.most_common(15)]
    lines += ["", "  Top functions by inclusive time (below the event loop):"]
    below_loop = [(name, c) for name, c in inclusive.most_common() if name not in loop_chain]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in below_loop[:top]]
    return "\n".join(lines)


# --- output ----------------------------------------------------------------------------

STEP_HEADER = (f"{'msg/s':>6} {'pub/s':>7} {'expected':>9} {'received':>9} {'loss':>7} {'dups':>5} {'lossySk':>7} "
               f"{'deliv/s':>9} {'p50ms':>7} {'p99ms':>7} {'maxms':>7} {'srvCPU':>6} {'(sys)':>5} {'core':>5} {'lgCPU':>6} "
               f"{'redis':>6} {'others':>6} {'us/dlv':>7}  ok")

fmt = _report.fmt


def failed_because(s: Step) -> str:
    return ", ".join(s.failures())


def step_row(s: Step) -> str:
    return (f"{s.rate:>6g} {s.pub_rate:>7.1f} {s.expected:>9} {s.received:>9} {s.loss:>7} {s.dups:>5} {s.lossy_sockets:>7} "
            f"{s.deliveries_per_s:>9,.0f} {fmt(s.p50_ms, '.1f'):>7} {fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>7.1f} "
            f"{s.server_cpu_pct:>5.0f}% {s.server_sys_pct:>4.0f}% {fmt(s.server_core_pct, '4.0f'):>4}% "
            f"{s.loadgen_cpu_pct:>5.0f}% {fmt(s.redis_cpu_pct, '5.1f'):>5}% {s.others_cpu_pct:>5.0f}% "
            f"{fmt(s.us_per_delivery, '.1f'):>7}  " + ("yes" if s.passed else f"NO ({failed_because(s)})"))


def ceiling_label(server: str) -> str:
    if server == "raw":
        return "raw = websockets.broadcast, framed once per connection"
    return f"rawframe = framed once, the same bytes to every transport.write ({rawframe_loop()})"


def summarize(runs: list[Run]) -> tuple[list[str], dict[str, Any]]:
    """The summary table per N (as text lines) and the same figures for the JSON summary."""
    lines = ["", "=" * 124,
             f"Summary: sustained = highest step where every joined socket got every message once (no loss, no "
             f"duplicates), the publisher achieved >= {RATE_SHARE:.0%} of the target rate and p99 <= {P99_LIMIT_MS:g} ms; "
             "pub/s = the publisher's achieved rate at that step; CPU/delivery = server CPU time / deliveries; "
             "vs ceil = deliveries/s over the faster ceiling's"]
    summary: dict[str, Any] = {}
    for n in sorted({r.n for r in runs}):
        here = [r for r in runs if r.n == n]
        ceilings = [r for r in here if r.server in CEILINGS and r.sustained]
        # Faster = the higher sustained step; when both sustain the same step (their deliveries/s then differ
        # by timing noise only), the one using less server CPU per delivery.
        ceiling = max(ceilings, default=None, key=lambda r: (r.sustained.rate, -(r.sustained.us_per_delivery or 0))
                      if r.sustained else (0.0, 0.0))
        top = ceiling.sustained.deliveries_per_s if ceiling and ceiling.sustained else None
        per_n: dict[str, Any] = {"ceiling": ceiling.server if ceiling else None}
        lines += ["", f"N = {n} sockets",
                  f"  {'server':<15} {'joined':>6} {'pub/s':>7} {'deliveries/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
                  f"{'CPU us/dlv':>10} {'(sys)':>5} {'srv CPU':>7} {'core':>5} {'lg CPU':>6} {'RSS MiB/1k':>10} "
                  f"{'peak dlv/s':>10} {'vs ceil':>7}"]
        seen: Counter[str] = Counter()
        for r in here:
            s, peak = r.sustained, r.peak
            seen[r.server] += 1
            key = r.server if seen[r.server] == 1 else f"{r.server}#{seen[r.server]}"  # --servers may repeat one
            ratio = s.deliveries_per_s / top if s and top else None
            bound = "" if r.limit_found else "  (every step passed: a lower bound)"
            per_n[key] = {
                "joined": r.joined, "target_rate": s.rate if s else None, "pub_rate": s.pub_rate if s else None,
                "deliveries_per_s": s.deliveries_per_s if s else None, "p50_ms": s.p50_ms if s else None,
                "p99_ms": s.p99_ms if s else None, "us_per_delivery": s.us_per_delivery if s else None,
                "rss_mb_per_1k": r.rss_mb_per_1k, "peak_deliveries_per_s": peak.deliveries_per_s if peak else None,
                "vs_ceiling": ratio, "limit_found": r.limit_found, "error": r.error}
            if s is None:
                note = f"  error: {r.error}" if r.error else "  (no step passed)"
                lines.append(f"  {r.server:<15} {r.joined:>6} {'-':>7} {'-':>12} {'-':>7} {'-':>7} {'-':>10} {'-':>5} {'-':>7} "
                             f"{'-':>5} {'-':>6} {fmt(r.rss_mb_per_1k, '.2f'):>10} "
                             f"{fmt(peak.deliveries_per_s if peak else None, ',.0f'):>10} {'-':>7}{note}")
                continue
            lines.append(
                f"  {r.server:<15} {r.joined:>6} {s.pub_rate:>7.1f} {s.deliveries_per_s:>12,.0f} {fmt(s.p50_ms, '.1f'):>7} "
                f"{fmt(s.p99_ms, '.1f'):>7} {fmt(s.us_per_delivery, '.1f'):>10} {s.server_sys_pct:>4.0f}% "
                f"{s.server_cpu_pct:>6.0f}% {fmt(s.server_core_pct, '4.0f'):>4}% {s.loadgen_cpu_pct:>5.0f}% "
                f"{fmt(r.rss_mb_per_1k, '.2f'):>10} {peak.deliveries_per_s if peak else 0:>10,.0f} "
                f"{fmt(ratio, '.2f'):>7}" + (f"  error: {r.error}" if r.error else bound))
        if ceiling is None:
            ran = [r.server for r in here if r.server in CEILINGS]
            lines.append(f"  ceiling: none ({' and '.join(ran)} passed no step)" if ran
                         else f"  ceiling: none (run {' or '.join(CEILINGS)} for the ratios)")
        else:
            others = [r for r in here if r.server in CEILINGS and r is not ceiling]
            lines.append(f"  ceiling: {ceiling_label(ceiling.server)}; the faster here"
                         + "".join(f" ({ceiling_label(o.server)}: {fmt(o.sustained.deliveries_per_s if o.sustained else None, ',.0f')}"
                                   " deliveries/s)" for o in others))
        summary[f"n_{n}"] = per_n
    shapes = {r.server: re.sub(r"\d+", "N", r.sample) for r in runs if r.sample}
    if shapes:
        distinct = sorted(set(shapes.values()))
        summary["same_frames"] = len(distinct) == 1
        if len(distinct) == 1:
            lines.append(f"\n  broadcast frames: the same from every server (digits as N): {distinct[0]}")
        else:
            lines.append("\n  broadcast frames DIFFER between servers (digits as N):")
            lines += [f"    {server}: {shape}" for server, shape in shapes.items()]
    disturbed = [(r, s) for r in runs for s in r.steps if s.others_cpu_pct >= DISTURBED_PCT]
    summary["disturbed_steps"] = len(disturbed)
    if disturbed:
        lines.append(f"\n  note: {len(disturbed)} step(s) ran while other processes used >= {DISTURBED_PCT:g}% of a core "
                     f"(e.g. {disturbed[0][0].server} N={disturbed[0][0].n} at {disturbed[0][1].rate:g} msg/s: "
                     f"{disturbed[0][1].others_cpu_pct:.0f}%)")
    return lines, summary


def step_tables(runs: list[Run]) -> list[str]:
    lines: list[str] = []
    for r in runs:
        lines += ["", f"== {r.server}  N={r.n}  joined {r.joined}" + (f"  error: {r.error}" if r.error else ""),
                  "  " + STEP_HEADER, *("  " + step_row(s) for s in r.steps)]
    return lines


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Broadcast fan-out benchmark (see module docstring).")
    p.add_argument("--sockets", type=int, nargs="+", help="socket counts N (default 1000 5000; quick: 200)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, help=f"servers to run (default {' '.join(DEFAULT_SERVERS)})")
    p.add_argument("--duration", type=float, help="seconds of publishing per step (default 3; quick: 2)")
    p.add_argument("--rates", type=float, nargs="+", help="publish rates in messages/s, rising")
    p.add_argument("--quick", action="store_true", help="small smoke run: 200 sockets, 2 steps, under a minute")
    p.add_argument("--workers", type=int, default=2, help="load-generator worker processes (default 2)")
    p.add_argument("--server-workers", type=int, default=2, help="server processes of daphne-workers (default 2)")
    p.add_argument("--client", choices=("lite", "websockets"), default="lite", help="load-generator client (default lite)")
    p.add_argument("--batch", type=int, default=20, help="handshakes in flight per worker while connecting")
    p.add_argument("--heartbeat", type=float, default=30.0, help="Phoenix heartbeat interval per socket, s (0 = none)")
    p.add_argument("--refine", type=int, default=2,
                   help="extra steps bisecting between the highest passing and lowest failing rate (default 2)")
    p.add_argument("--quiet-wait", type=float,
                   help=f"before each step, wait up to this many seconds for other processes to use < {DISTURBED_PCT:g}%% "
                        "of a core (default 60; quick: 3; 0 = never wait)")
    p.add_argument("--max-drain", type=float, default=10.0, help="max seconds to wait for a step's deliveries")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and load generator to separate CPUs")
    p.add_argument("--profile", nargs="*", choices=SERVERS, help="py-spy profile of these servers (bare flag: daphne) at the largest N")
    p.add_argument("--profile-seconds", type=float, default=12.0)
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 3600; quick: 120)")
    p.add_argument("--log-dir", type=Path, help="where server logs and profiles go (default: a temp dir)")
    p.add_argument("--server-ref", help="run the servers from a clean export of this git ref (default: the working tree)")
    p.add_argument("--json", type=Path, help="JSON results (default: <log dir>/broadcast.json)")
    p.add_argument("--raw-server-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rawframe-server-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sockets = args.sockets or ([200] if args.quick else [1000, 5000])
    args.servers = args.servers or list(DEFAULT_SERVERS)
    args.duration = args.duration or (2.0 if args.quick else 3.0)
    args.rates = sorted(args.rates or (QUICK_RATES if args.quick else DEFAULT_RATES))
    args.timeout = args.timeout or (120.0 if args.quick else 3600.0)
    if args.quiet_wait is None:
        args.quiet_wait = 3.0 if args.quick else 60.0
    if args.profile is not None and not args.profile:
        args.profile = ["daphne"]
    args.profile = args.profile or []
    return args


def export_ref(ref: str, log_dir: Path) -> tuple[Path, str]:
    """A clean copy of the repository at ``ref`` (``git archive``), for servers to run from."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    target = log_dir / f"src-{sha[:12]}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0:
            raise BenchError(f"git archive {sha} failed")
    return target, sha


def describe_tree(path: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=path, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True).stdout.strip()
        return f"working tree at {sha}" + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return str(path)


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JWT_SECRET", JWT_SECRET_DEFAULT)
    env.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
    env.setdefault("REALTIME_IDLE_TIMEOUT_S", "3600")
    # The publisher is one socket sending thousands of broadcasts a second: far past the
    # per-socket limits, which stay on (so their counting is measured) but cannot trip.
    for name in ("EVENTS", "FRAMES", "BYTES", "PRESENCE_EVENTS", "JOINS"):
        env.setdefault(f"REALTIME_MAX_{name}_PER_SECOND", "1000000000")
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        sys.path.insert(0, str(REPO))
        try:
            from devservices.services import ensure_services
        except ImportError:
            ensure_services = None
        if ensure_services is not None:
            env.update(ensure_services(env))
        env.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:54329/realtime")
        env.setdefault("REDIS_URL", "redis://127.0.0.1:63799/0")
    return env


def _on_signal(signum: int, _frame: Any) -> None:
    if signum == signal.SIGALRM:
        raise TimeoutError("global time budget exceeded")
    raise SystemExit(128 + signum)


def begin_run(args: argparse.Namespace, name: str, grace_s: int) -> tuple[float, int, Path]:
    """Start a bench run: the time budget (``args.deadline``; SIGALRM ``grace_s`` after it, and
    SIGTERM, end the run with an exception so it cleans up), the open-file limit raised, the log folder.

    Returns (start time, the open-file limit, the log folder).
    """
    started = time.monotonic()
    args.deadline = started + args.timeout
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(int(math.ceil(args.timeout)) + grace_s)
    nofile = raise_nofile()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return started, nofile, log_dir


class Outcome:
    """How a guarded run ended: ``code`` 0, 1 after an error, 130 when interrupted or out of time."""

    code = 0


@contextlib.contextmanager
def guarded_run(cleanup: Callable[[], None],
                expected: tuple[type[Exception], ...] = (BenchError, OSError, lg.HandshakeError)) -> Iterator[Outcome]:
    """The body of a run begun by ``begin_run``: an error or interruption in it is printed (with a traceback
    unless ``expected``) and ends the block; then the alarm is cancelled and ``cleanup`` runs whatever
    happened, with Ctrl-C ignored so it cannot be cut short."""
    outcome = Outcome()
    try:
        yield outcome
    except (KeyboardInterrupt, TimeoutError, SystemExit) as reason:
        outcome.code = 130
        print(f"\ninterrupted: {reason!r}", flush=True)
    except Exception as error:
        outcome.code = 1
        print(f"ERROR: {type(error).__name__}: {error}", flush=True)
        if not isinstance(error, expected):
            traceback.print_exc()
    finally:
        signal.alarm(0)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_server_port:
        run_raw_server(args.raw_server_port)
        return 0
    if args.rawframe_server_port:
        run_rawframe_server(args.rawframe_server_port)
        return 0
    available = [s for s in args.servers if s != "uvicorn-sansio"
                 or importlib.util.find_spec("uvicorn.protocols.websockets.websockets_sansio_impl")]
    if len(available) != len(args.servers):
        print("uvicorn-sansio is not available in this uvicorn: skipped", flush=True)
    args.servers = available
    started, nofile, log_dir = begin_run(args, "broadcast", 15)
    if nofile < max(args.sockets) + 200:
        print(f"warning: RLIMIT_NOFILE is {nofile}, below {max(args.sockets) + 200}", flush=True)
    runs: list[Run] = []
    bench: Bench | None = None
    try:
        if args.server_ref:
            args.server_dir, sha = export_ref(args.server_ref, log_dir)
            source = f"git {args.server_ref} = {sha[:12]} (exported to {args.server_dir})"
        else:
            args.server_dir = REPO
            source = describe_tree(REPO)
        env = service_env()
        bench = Bench(args, env, log_dir)
        print(f"broadcast bench: servers={' '.join(args.servers)} sockets={' '.join(map(str, args.sockets))} "
              f"rates={' '.join(f'{r:g}' for r in args.rates)} step={args.duration:g}s client={args.client} "
              f"workers={args.workers} heartbeat={args.heartbeat:g}s; ceilings: {ceiling_label('raw')}; "
              f"{ceiling_label('rawframe')}", flush=True)
        print(f"server code: {source}", flush=True)
        print("columns: srvCPU = server process CPU, user + system (% of one core; system time includes the loopback "
              "TCP receive work done in its send calls); (sys) = system share of it; core = busy time of the server's "
              "CPU when pinned, whoever it is charged to (softirq/ksoftirqd work for the server's sends shows here); lgCPU = load generator (workers "
              "+ publisher, % of their cores); redis = redis-server CPU; others = every other user process on the "
              "machine (% of one core); us/dlv = server CPU microseconds per delivery", flush=True)
        print(f"cpus={os.cpu_count()} pinning: server cpu {sorted(bench.server_cpus) if bench.server_cpus else 'any'}, "
              f"load generator cpu {sorted(bench.loadgen_cpus) if bench.loadgen_cpus else 'any'} "
              f"(lgCPU = % of {bench.loadgen_cores} core(s)); redis pid {bench.redis_pid or '?'} unpinned; logs in {log_dir}",
              flush=True)
        for n in args.sockets:
            for kind in args.servers:
                if time.monotonic() > args.deadline - 30:
                    print(f"skipping {kind} N={n}: time budget spent", flush=True)
                    continue
                print(f"\n== {kind}  N={n}", flush=True)
                runs.append(bench.run(kind, n, profile=kind in args.profile and n == max(args.sockets)))
    except (KeyboardInterrupt, TimeoutError, SystemExit) as stop_reason:
        print(f"\ninterrupted: {stop_reason!r}", flush=True)
    finally:
        signal.alarm(0)
        stop_all()
        if bench is not None:
            bench.cleanup_redis()
    lines, summary = summarize(runs)
    print("\n".join(lines) + "\n")
    for run in runs:
        if run.profile:
            print(run.profile + "\n")
    text_path = log_dir / "broadcast.txt"
    text_path.write_text("\n".join(step_tables(runs) + lines) + "\n")
    meta = _report.run_meta("broadcast", quick=args.quick, duration_s=args.duration, client=args.client,
                            workers=args.workers, servers=args.servers, sockets=args.sockets,
                            rawframe_loop=rawframe_loop(), p99_limit_ms=P99_LIMIT_MS, rate_share=RATE_SHARE)
    json_path = args.json or log_dir / "broadcast.json"
    _report.write_json(json_path, ({"server": r.server, "n": r.n, **asdict(s), "loss": s.loss, "rate_ok": s.rate_ok,
                                    "passed": s.passed} for r in runs for s in r.steps), {**meta, **summary})
    print(f"total {time.monotonic() - started:.0f}s; logs and raw profiles in {log_dir}; text in {text_path}, "
          f"JSON in {json_path}")
    return 0 if runs and all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
