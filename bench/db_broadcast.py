"""Broadcast from the database: ``realtime.send`` into one public topic, against REST broadcasts.

Starts one daphne server (``manage.py runserver``, pinned like ``broadcast.py``)
and one replicator (``manage.py replicate`` on slots of its own, ``<slot>`` and
``<slot>_messages``, dropped at the end). Subscribers are vsn 1.0.0 sockets
(text frames) joined to the PUBLIC topic ``realtime:bench-db``, held by worker
processes (this script with ``--worker``, lite epoll client of ``_loadgen.py``).

For each subscriber count and rate, two steps:

* ``rest``: the baseline, ``POST /realtime/v1/api/broadcast`` with a
  service_role token (the messages due at each 5 ms tick batched into one
  request, at most 100);
* ``db``: ``SELECT realtime.send(payload, 'tick', 'bench-db', false)``, each its
  own transaction (autocommit), from ``--senders`` connections in pipeline mode.

Every payload is ``{"s": step, "seq": n, "t": time_ns}``, ``t`` taken by the
sender just before the statement (db) or the request (rest), so latency is
send-to-client, commit included. Each worker counts, per subscriber, the
distinct seq numbers (loss) and the repeated ones (duplicates). The tick parser
here accepts jsonb's re-serialization (``{"s": 1, "t": 123, "id": "..", "seq": 5}``).

Then replay: ``--replay-joins`` sockets, one after another, join the PRIVATE
topic ``realtime:bench-replay`` (read policy ``bench_replay_read`` created if
missing; rows inserted with ``realtime.send(..., true)``) with
``replay: {since: 0, limit: 25}`` and an authenticated JWT; the time from
sending the join to the 25th replayed broadcast is recorded.

Usage::

    .venv/bin/python bench/db_broadcast.py --quick   # < 2 min
    .venv/bin/python bench/db_broadcast.py           # < 8 min
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import _cpu  # noqa: E402
import _loadgen as lg  # noqa: E402
import _report  # noqa: E402
import broadcast as bc  # noqa: E402

HOST = "127.0.0.1"
TOPIC = "bench-db"
REPLAY_TOPIC = "bench-replay"
EVENT = "tick"
SLOT_PREFIX = "bench_dbb_"
P99_LIMIT_MS = 100.0
TARGET_SENDS = 2000
TARGET_SUBS = 100
REPLAY_LIMIT = 25
TICK_RE = re.compile(rb'"(s|t|seq)": ?(\d+)')


def join_frame_v1(topic: str, payload: dict[str, Any], ref: str = "1") -> bytes:
    return json.dumps({"topic": f"realtime:{topic}", "event": "phx_join", "payload": payload,
                       "ref": ref, "join_ref": ref}, separators=(",", ":")).encode()


def mint_jwt(secret: str, claims: dict[str, Any]) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps({"iat": now, "exp": now + 86400, **claims}, separators=(",", ":")).encode())
    sig = b64(hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    return f"{header}.{body}.{sig}"


def parse_tick_tolerant(frame: bytes) -> tuple[int, int, int] | None:
    """(step, seq, sent_ns) of a tick, whatever the spacing and key order (jsonb or compact JSON)."""
    found = dict(TICK_RE.findall(frame))
    try:
        return int(found[b"s"]), int(found[b"seq"]), int(found[b"t"])
    except KeyError:
        return None


# --- subscriber worker (a child process) ------------------------------------------------


def wait_join_reply_v1(conn: lg.LiteConn, deadline: float) -> None:
    """Block until the ok reply to a vsn 1.0.0 join (ref "1") has arrived."""
    while True:
        got = conn.recv_text(deadline)
        if b'"phx_reply"' in got and b'"ref":"1"' in got:
            if b'"status":"ok"' not in got:
                raise lg.HandshakeError("join refused: " + got[:300].decode("utf-8", "replace"))
            return


def run_worker(cfg: dict[str, Any]) -> None:
    frame = join_frame_v1(TOPIC, {"config": {"broadcast": {"self": False, "ack": False}}})
    conns, errors = lg.open_joined(cfg["host"], int(cfg["port"]), cfg["path"], int(cfg["count"]), 20, 30.0,
                                   join=frame, wait_reply=wait_join_reply_v1)
    lg.emit({"ready": True, "joined": len(conns), "errors": errors[:3]})
    index = {c.fd: i for i, c in enumerate(conns)}
    # step -> [count, first_ns, last_ns, hist, max_us, dups, per-conn seen bytearrays]
    steps: dict[int, list[Any]] = {}
    counters = {"frames": 0, "ticks": 0, "other": 0, "closed": 0}
    pool = lg.Pool(conns, counters, batch_wait_s=0.001)
    control_frame = pool.control_frame
    n_conns = len(conns)

    def handle(line: bytes) -> bool:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "count":
            st = steps.get(int(msg["step"]))
            lg.emit({"recv": st[0] if st else 0, "ticks": counters["ticks"]})
        elif cmd == "stats":
            st = steps.pop(int(msg["step"]), None)
            expected = int(msg["expected"])
            if st is None:
                lg.emit({"recv": 0, "dups": 0, "hist": [], "max_us": 0, "first_ns": 0, "last_ns": 0,
                         "missing": [expected] * n_conns, "cpu": time.process_time(), "open": len(pool.by_fd)})
            else:
                missing = [expected - sum(seen[:expected]) for seen in st[6]]
                lg.emit({"recv": st[0], "dups": st[5], "hist": [[i, c] for i, c in enumerate(st[3]) if c],
                         "max_us": st[4], "first_ns": st[1], "last_ns": st[2], "missing": missing,
                         "cpu": time.process_time(), "open": len(pool.by_fd)})
        elif cmd == "cpu":
            lg.emit({"cpu": time.process_time(), "counters": counters})
        elif cmd == "quit":
            lg.emit({"bye": True})
            return False
        return True

    def on_frames(conn: lg.LiteConn, data: bytes, spans: lg.Spans, now: int) -> None:
        ci = index[conn.fd]
        for b0, start, end in spans:
            if b0 & 0x0F != 1:
                if not control_frame(conn, b0, data, start, end):
                    return
                continue
            tick = parse_tick_tolerant(data[start:end])
            if tick is None:
                counters["other"] += 1
                continue
            counters["ticks"] += 1
            step, seq, sent = tick
            st = steps.get(step)
            if st is None:
                st = steps[step] = [0, now, now, [0] * lg.NBUCKETS, 0, 0,
                                    [bytearray(1024) for _ in range(n_conns)]]
            seen = st[6][ci]
            if seq >= len(seen):
                seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
            if seen[seq]:
                st[5] += 1
                continue
            seen[seq] = 1
            st[0] += 1
            st[2] = now
            lat = (now - sent) // 1000
            if lat < lg.FINE_LIMIT_US:
                st[3][lat // lg.FINE_US if lat > 0 else 0] += 1
            else:
                st[3][min(lg.FINE_BUCKETS + (lat - lg.FINE_LIMIT_US) // lg.COARSE_US, lg.NBUCKETS - 1)] += 1
            if lat > st[4]:
                st[4] = lat

    pool.run(on_frames, handle)


# --- senders ---------------------------------------------------------------------------


def run_senders(run: Callable[[int], None], senders: int, total: int, t0: float, errors: list[str]) -> dict[str, Any]:
    """``run(i)`` in one thread per sender until all are done; what they sent, at what rate since ``t0``."""
    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"sent": total, "wall": wall, "rate": total / wall, "errors": errors}


def db_send(conns: list[Any], step: int, rate: float, duration: float) -> dict[str, Any]:
    """realtime.send at ``rate`` for ``duration`` s from the pipelined connections ``conns`` (autocommit)."""
    total = max(1, round(rate * duration))
    senders = len(conns)
    query = "SELECT realtime.send(%s::jsonb, %s, %s, false)"
    errors: list[str] = []
    t0 = time.monotonic() + 0.05

    def run(i: int) -> None:
        conn = conns[i]
        seq = i
        try:
            with conn.pipeline() as p, conn.cursor() as cur:
                while seq < total:
                    due = min(total, int((time.monotonic() - t0) * rate) + 1)
                    if seq >= due:
                        delay = t0 + seq / rate - time.monotonic()
                        if delay > 0:
                            time.sleep(min(delay, 0.005))
                        continue
                    while seq < due:
                        payload = f'{{"s":{step},"seq":{seq},"t":{time.time_ns()}}}'
                        cur.execute(query, (payload, EVENT, TOPIC), prepare=True)
                        seq += senders
                    p.sync()
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error)[:200])

    return run_senders(run, senders, total, t0, errors)


def rest_send(port: int, token: str, step: int, rate: float, duration: float, senders: int,
              batch_s: float) -> dict[str, Any]:
    """REST broadcasts at ``rate`` from ``senders`` keep-alive connections; each sends what is due (<= 100
    messages a request) every ``batch_s`` at most, stamped with the time of the request."""
    total = max(1, round(rate * duration))
    headers = {"Authorization": f"Bearer {token}", "apikey": token, "Content-Type": "application/json"}
    errors: list[str] = []
    t0 = time.monotonic() + 0.05

    def run(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        seq = i  # this sender's seq numbers: i, i + senders, ...
        last = 0.0
        try:
            while seq < total:
                due = min(total, int((time.monotonic() - t0) * rate) + 1)
                if seq >= due:
                    time.sleep(max(0.0, min(0.005, t0 + seq / rate - time.monotonic())))
                    continue
                if last and time.monotonic() - last < batch_s:
                    time.sleep(batch_s - (time.monotonic() - last))
                    continue
                last = time.monotonic()
                now = time.time_ns()
                mine = list(range(seq, due, senders))[:100]
                seq = mine[-1] + senders
                msgs = [{"topic": TOPIC, "event": EVENT, "private": False,
                         "payload": {"s": step, "seq": n, "t": now}} for n in mine]
                conn.request("POST", "/realtime/v1/api/broadcast", json.dumps({"messages": msgs}), headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 202 and len(errors) < 3:
                    errors.append(f"{resp.status} {body[:200]!r}")
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error)[:200])
        finally:
            conn.close()

    return run_senders(run, senders, total, t0, errors)


# --- results ----------------------------------------------------------------------------


@dataclass
class Step:
    path: str
    subs: int
    rate: float
    sent: int = 0
    send_rate: float = 0.0
    expected: int = 0
    received: int = 0
    dups: int = 0
    lossy_subs: int = 0
    max_sub_loss: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float = 0.0
    dlv_per_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def loss(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def ok(self) -> bool:
        return (self.received > 0 and self.loss == 0 and self.dups == 0 and self.p99_ms is not None
                and self.p99_ms <= P99_LIMIT_MS and not self.errors)


class Bench:
    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        import psycopg

        self.args = args
        self.log_dir = log_dir
        self.slot = f"{SLOT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.prefix = f"rtbenchdb{os.getpid()}"
        self.env = dict(env, REALTIME_LAYER_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        self.dsn = self.env["DATABASE_URL"]
        self.pg = psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench admin")
        secret = self.env["JWT_SECRET"]
        self.anon = lg.mint_jwt(secret, "anon")
        self.service = lg.mint_jwt(secret, "service_role")
        self.user = mint_jwt(secret, {"role": "authenticated", "aud": "authenticated", "sub": str(uuid.uuid4())})
        self.path = f"/realtime/v1/websocket?apikey={self.anon}&vsn=1.0.0"
        self.server_cpus, self.loadgen_cpus, _ = _cpu.pin(args.pin)
        self.server: subprocess.Popen[bytes] | None = None
        self.replicator: subprocess.Popen[bytes] | None = None
        self.workers: list[bc.Worker] = []
        self.port = 0
        self.step_id = 0
        self.db_conns: list[Any] = []
        self.redis_pid = bc.redis_pid() or next(iter(pids_named("redis-server")), None)

    def sql(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.pg.execute(query, params)
        return cur.fetchall() if cur.description else []

    def start(self) -> None:
        cwd = self.args.server_dir
        self.port = bc.free_port()
        log = open(self.log_dir / "server.log", "wb")
        self.server = bc.spawn([sys.executable, "manage.py", "runserver", f"{HOST}:{self.port}", "--noreload"],
                               cpus=self.server_cpus, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        rlog_path = self.log_dir / "replicator.log"
        rlog = open(rlog_path, "wb")
        self.replicator = bc.spawn([sys.executable, "manage.py", "replicate", "--slot", self.slot], cpus=None,
                                   env=self.env, cwd=cwd, stdout=rlog, stderr=subprocess.STDOUT)
        rlog.close()
        bc.wait_port(self.port, self.server, 90)
        deadline = time.monotonic() + 60
        while rlog_path.read_bytes().count(b"active: streaming slot") < 2:
            if self.replicator.poll() is not None or time.monotonic() > deadline:
                raise bc.BenchError("replicator did not stream both slots: " + rlog_path.read_text()[-1500:])
            time.sleep(0.05)

    def start_workers(self, n: int) -> None:
        k = max(1, min(self.args.workers, n))
        log = open(self.log_dir / "workers.log", "ab")
        for i in range(k):
            count = n // k + (1 if i < n % k else 0)
            cfg = {"host": HOST, "port": self.port, "path": self.path, "count": count}
            w = bc.Worker.__new__(bc.Worker)
            w.index, w.buf, w.info = i, b"", {}
            w.proc = bc.spawn([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                              cpus=self.loadgen_cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            self.workers.append(w)
        log.close()
        joined = 0
        for w in self.workers:
            info = w.read(120)
            if not info or not info.get("ready"):
                raise bc.BenchError(f"worker {w.index} did not start: {info}")
            joined += info["joined"]
            if info["errors"]:
                print(f"  worker {w.index} join errors: {info['errors']}", flush=True)
        if joined != n:
            raise bc.BenchError(f"only {joined} of {n} subscribers joined")

    def stop_workers(self) -> None:
        for w in self.workers:
            w.quit()
        self.workers = []

    def count(self, step: int) -> int:
        return sum(w.rpc({"cmd": "count", "step": step})["recv"] for w in self.workers)

    def cpu(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": time.monotonic()}
        for name, proc in (("server", self.server), ("repl", self.replicator)):
            if proc is not None and (seconds := _cpu.cpu_or_none(proc.pid)) is not None:
                out[name] = seconds
        out["subs"] = _cpu.cpu_of(w.proc.pid for w in self.workers)
        out["sender"] = sum(os.times()[:2])
        out["pg"] = _cpu.cpu_by_pid(_report.postgres_pids())
        if (redis := _cpu.cpu_or_none(self.redis_pid)) is not None:
            out["redis"] = redis
        out["idle"] = _cpu.idle_seconds()
        return out

    def step(self, path: str, n: int, rate: float) -> Step:
        self.step_id += 1
        sid = self.step_id
        st = Step(path, n, rate)
        c0 = self.cpu()
        if path == "db":
            if not self.db_conns:
                import psycopg

                self.db_conns = [psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench db sender")
                                 for _ in range(self.args.senders)]
            res = db_send(self.db_conns, sid, rate, self.args.duration)
        else:
            res = rest_send(self.port, self.service, sid, rate, self.args.duration, self.args.rest_senders,
                            self.args.rest_batch_ms / 1000)
        st.sent, st.send_rate, st.errors = res["sent"], res["rate"], res["errors"]
        st.expected = st.sent * n
        # drain: until everything arrived, or nothing new for 2 s (at most 20 s)
        last, still = -1, time.monotonic()
        end = time.monotonic() + 20
        while time.monotonic() < end:
            got = self.count(sid)
            if got >= st.expected:
                break
            if got != last:
                last, still = got, time.monotonic()
            elif time.monotonic() - still > 2:
                break
            time.sleep(0.1)
        c1 = self.cpu()
        wall = c1["t"] - c0["t"]
        st.cpu = {k: 100 * (c1[k] - c0[k]) / wall for k in c1 if k not in ("t", "pg") and k in c0}
        # postgres: per process, those that exist at both ends of the step (backends come and go)
        st.cpu["pg"] = 100 * sum(v - c0["pg"][pid] for pid, v in c1["pg"].items() if pid in c0["pg"]) / wall
        replies = [w.rpc({"cmd": "stats", "step": sid, "expected": st.sent}) for w in self.workers]
        for r in replies:
            st.dups += r["dups"]
            losses = [m for m in r["missing"] if m > 0]
            st.lossy_subs += len(losses)
            st.max_sub_loss = max([st.max_sub_loss, *losses])
        merged = lg.merge_stats(replies)
        st.received, st.p50_ms, st.p99_ms, st.max_ms = merged.received, merged.p50_ms, merged.p99_ms, merged.max_ms
        span = (merged.last_ns - merged.first_ns) / 1e9 if merged.last_ns > merged.first_ns else 0
        st.dlv_per_s = st.received / span if span else 0.0
        return st

    def run_subs(self, n: int, rates: list[float]) -> list[Step]:
        steps: list[Step] = []
        self.start_workers(n)
        try:
            failed = {"rest": False, "db": False}
            for rate in rates:
                for path in ("rest", "db"):
                    if failed[path]:
                        continue
                    if time.monotonic() > self.args.deadline - 40:
                        print("  (time budget nearly spent: skipping the remaining steps)", flush=True)
                        return steps
                    s = self.step(path, n, rate)
                    steps.append(s)
                    print(step_row(s), flush=True)
                    if s.loss or s.dups or s.errors or (s.p99_ms or 0) > 1000 or s.send_rate < 0.9 * rate:
                        failed[path] = True  # drowning (or the sender cannot keep up): no higher rate
                    if not s.ok:
                        time.sleep(2)
        finally:
            self.stop_workers()
        return steps

    # --- replay --------------------------------------------------------------------

    def setup_replay(self) -> None:
        if not self.sql("SELECT 1 FROM pg_policies WHERE schemaname = 'realtime' AND tablename = 'messages' "
                        "AND policyname = 'bench_replay_read'"):
            self.sql("CREATE POLICY bench_replay_read ON realtime.messages FOR SELECT TO authenticated "
                     "USING (realtime.topic() LIKE 'bench-replay%')")
        for i in range(REPLAY_LIMIT + 5):
            self.sql("SELECT realtime.send(%s::jsonb, 'old', %s, true)", (json.dumps({"i": i}), REPLAY_TOPIC))

    def replay(self, joins: int) -> dict[str, Any]:
        payload = {"config": {"private": True, "broadcast": {"replay": {"since": 0, "limit": REPLAY_LIMIT}}},
                   "access_token": self.user}
        frame = join_frame_v1(REPLAY_TOPIC, payload)
        lat_ms: list[float] = []
        reply_ms: list[float] = []
        errors: list[str] = []
        for _ in range(joins):
            conn = lg.LiteConn(HOST, self.port, 10)
            try:
                conn.send_handshake(HOST, self.port, self.path)
                conn.recv_handshake()
                deadline = time.monotonic() + 5
                t0 = time.perf_counter()
                conn.send(1, frame)
                got = 0
                while got < REPLAY_LIMIT:
                    text = conn.recv_text(deadline)
                    if b'"phx_reply"' in text:
                        reply_ms.append((time.perf_counter() - t0) * 1000)
                        if b'"status":"ok"' not in text:
                            raise lg.HandshakeError(text[:300].decode("utf-8", "replace"))
                    elif b'"replayed":true' in text:
                        got += 1
                lat_ms.append((time.perf_counter() - t0) * 1000)
            except (OSError, lg.HandshakeError) as error:
                if len(errors) < 3:
                    errors.append(repr(error)[:300])
            finally:
                conn.close()
        return {"joins": joins, "ok": len(lat_ms), "errors": errors,
                "reply_p50_ms": pct(reply_ms, 0.5), "reply_p99_ms": pct(reply_ms, 0.99),
                "p50_ms": pct(lat_ms, 0.5), "p99_ms": pct(lat_ms, 0.99), "max_ms": max(lat_ms) if lat_ms else None}

    def cleanup(self) -> None:
        self.stop_workers()
        for c in self.db_conns:
            with contextlib.suppress(Exception):
                c.close()
        for proc in (self.replicator, self.server):
            if proc is not None:
                bc.stop(proc, timeout=10)
        bc.stop_all()
        for name in (self.slot, f"{self.slot}_messages"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rows = self.sql("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,))
                if not rows:
                    break
                if not rows[0][0]:
                    with contextlib.suppress(Exception):
                        self.sql("SELECT pg_drop_replication_slot(%s)", (name,))
                    break
                time.sleep(0.2)
            else:
                print(f"  could not drop slot {name}", flush=True)
        with contextlib.suppress(Exception):
            self.sql("DELETE FROM realtime.messages WHERE topic IN (%s, %s)", (TOPIC, REPLAY_TOPIC))
        bc.delete_redis_keys(self.env.get("REDIS_URL"), [self.prefix])
        with contextlib.suppress(Exception):
            self.pg.close()


pids_named = _report.pids_named


pct = _report.percentile
fmt = _report.fmt


HEADER = (f"{'path':>4} {'subs':>5} {'rate':>6} {'sent/s':>7} {'dlv/s':>8} {'expected':>9} {'loss':>8} "
          f"{'lossySub':>8} {'maxSubLoss':>10} {'dups':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} "
          f"{'srv%':>5} {'repl%':>5} {'pg%':>5} {'redis%':>6} {'subs%':>5} {'send%':>5} {'idle%':>5}  ok")


def step_row(s: Step) -> str:
    return (f"{s.path:>4} {s.subs:>5} {s.rate:>6g} {s.send_rate:>7.0f} {s.dlv_per_s:>8.0f} {s.expected:>9} "
            f"{s.loss:>8} {s.lossy_subs:>8} {s.max_sub_loss:>10} {s.dups:>6} {fmt(s.p50_ms, '.1f'):>7} "
            f"{fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>8.1f} {s.cpu.get('server', 0):>5.0f} {s.cpu.get('repl', 0):>5.0f} "
            f"{s.cpu.get('pg', 0):>5.0f} {s.cpu.get('redis', 0):>6.0f} {s.cpu.get('subs', 0):>5.0f} {s.cpu.get('sender', 0):>5.0f} "
            f"{s.cpu.get('idle', 0):>5.0f}  {'yes' if s.ok else 'NO'}" + (f"  errors: {s.errors}" if s.errors else ""))


def summarize(steps: list[Step], replay: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    lines = ["", "== summary", HEADER, *(step_row(s) for s in steps), ""]
    summary: dict[str, Any] = {}
    for path in ("rest", "db"):
        for n in sorted({s.subs for s in steps}):
            good = [s for s in steps if s.path == path and s.subs == n and s.ok]
            best = max(good, key=lambda s: s.send_rate) if good else None
            summary[f"{path}_{n}_sustained_sends_per_s"] = round(best.send_rate) if best else 0
            lines.append(f"  {path:>4} N={n:>5}: highest passing step {fmt(best.rate if best else None, 'g')} "
                         f"(achieved {fmt(best.send_rate if best else None, ',.0f')} sends/s, "
                         f"{fmt(best.dlv_per_s if best else None, ',.0f')} deliveries/s, p99 "
                         f"{fmt(best.p99_ms if best else None, '.1f')} ms)")
    tgt = [s for s in steps if s.path == "db" and s.subs == TARGET_SUBS and s.ok and s.send_rate >= TARGET_SENDS * 0.98]
    db_pass = bool(tgt)
    summary["target_db_sends"] = "PASS" if db_pass else "FAIL"
    lines.append(f"  target >= {TARGET_SENDS:,} sends/s into {TARGET_SUBS} subscribers, no loss, p99 <= "
                 f"{P99_LIMIT_MS:g} ms: {'PASS' if db_pass else 'FAIL'}")
    if replay is not None:
        ok = replay["ok"] == replay["joins"] and replay["p99_ms"] is not None and replay["p99_ms"] <= P99_LIMIT_MS
        summary["replay"] = replay
        summary["target_replay"] = "PASS" if ok else "FAIL"
        lines.append(f"  replay: {replay['ok']}/{replay['joins']} joins got {REPLAY_LIMIT} replayed rows; join->reply "
                     f"p50 {fmt(replay['reply_p50_ms'], '.1f')} p99 {fmt(replay['reply_p99_ms'], '.1f')} ms; "
                     f"join->{REPLAY_LIMIT}th row p50 {fmt(replay['p50_ms'], '.1f')} p99 {fmt(replay['p99_ms'], '.1f')} "
                     f"max {fmt(replay['max_ms'], '.1f')} ms" + (f"; errors {replay['errors']}" if replay["errors"] else ""))
        lines.append(f"  target replay join p99 <= {P99_LIMIT_MS:g} ms: {'PASS' if ok else 'FAIL'}")
    return lines, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="short run (< 2 min)")
    p.add_argument("--subs", type=int, nargs="+", help="subscriber counts (default 100 1000)")
    p.add_argument("--rates", type=float, nargs="+", help="sends/s steps for 100 subscribers")
    p.add_argument("--rates-1000", type=float, nargs="+", help="sends/s steps for 1,000 (and more) subscribers")
    p.add_argument("--duration", type=float, help="seconds per step (default 8; quick 3)")
    p.add_argument("--workers", type=int, default=2, help="subscriber worker processes")
    p.add_argument("--senders", type=int, default=8, help="database connections sending realtime.send")
    p.add_argument("--rest-senders", type=int, default=2, help="HTTP connections sending REST broadcasts")
    p.add_argument("--rest-batch-ms", type=float, default=20.0,
                   help="each REST sender posts what is due at most every this many ms (one request, <= 100 messages)")
    p.add_argument("--replay-joins", type=int, help="sequential replay joins (default 100; quick 30)")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--server-ref", help="run server and replicator from a clean git archive of this ref")
    p.add_argument("--timeout", type=float, help="time budget in s (default 450; quick 110)")
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--json", type=Path, help="JSON results (default: <log dir>/db_broadcast.json)")
    a = p.parse_args(argv)
    q = a.quick
    a.subs = a.subs or [100, 1000]
    a.rates = a.rates or ([500, 2000] if q else [250, 500, 1000, 2000, 3000])
    a.rates_1000 = a.rates_1000 or ([100] if q else [50, 100, 250, 500])
    a.duration = a.duration or (3.0 if q else 8.0)
    a.replay_joins = a.replay_joins or (30 if q else 100)
    a.timeout = a.timeout or (110.0 if q else 450.0)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    started, _, log_dir = bc.begin_run(args, "dbbroadcast", 10)
    steps: list[Step] = []
    replay: dict[str, Any] | None = None
    bench: Bench | None = None
    code = 0
    try:
        if args.server_ref:
            args.server_dir, sha = bc.export_ref(args.server_ref, log_dir)
            source = f"git {args.server_ref} = {sha[:12]}"
        else:
            args.server_dir = REPO
            source = bc.describe_tree(REPO)
        env = bc.service_env()
        bench = Bench(args, env, log_dir)
        print(f"db_broadcast bench: subs={args.subs} rates(100)={args.rates} rates(1000+)={args.rates_1000} "
              f"step={args.duration:g}s workers={args.workers} senders={args.senders} client=lite vsn 1.0.0 (text)",
              flush=True)
        print(f"server code: {source}; cpus={os.cpu_count()} ({_report.cpu_model()}); pinning: server cpu "
              f"{sorted(bench.server_cpus) if bench.server_cpus else 'any'}, load generator + senders cpu "
              f"{sorted(bench.loadgen_cpus) if bench.loadgen_cpus else 'any'}; replicator, postgres, redis unpinned; "
              f"slot {bench.slot}; logs in {log_dir}", flush=True)
        print("columns: rate = target sends/s; sent/s = achieved by the sender (db: realtime.send, one transaction "
              "each; rest: POST /api/broadcast, what is due every --rest-batch-ms per connection in one request, stamped at the "
              "request); dlv/s = deliveries/s over the step's receive span; "
              "loss/dups over all subscribers (per-subscriber seq numbers); lossySub = subscribers missing any; "
              "latency = sender clock before the statement/request -> receipt; srv%/repl%/pg%/subs%/send% = CPU of the "
              "server, replicator, all postgres processes (of every database), redis, subscriber workers, this process (senders), % of one core; "
              "idle% = idle time of the whole machine (% of one core)",
              flush=True)
        bench.start()
        bench.setup_replay()
        print("\n" + HEADER, flush=True)
        for n in args.subs:
            steps += bench.run_subs(n, args.rates if n <= 100 else args.rates_1000)
        print("\n== replay", flush=True)
        replay = bench.replay(args.replay_joins)
    except (KeyboardInterrupt, TimeoutError, SystemExit) as reason:
        code = 130
        print(f"\ninterrupted: {reason!r}", flush=True)
    except (bc.BenchError, OSError, lg.HandshakeError) as error:
        code = 1
        print(f"ERROR: {error}", flush=True)
    finally:
        signal.alarm(0)
        if bench is not None:
            bench.cleanup()
        else:
            bc.stop_all()
    lines, summary = summarize(steps, replay)
    text = "\n".join(lines)
    print(text)
    (log_dir / "db_broadcast.txt").write_text(text + "\n")
    meta = _report.run_meta("db_broadcast", quick=args.quick, duration_s=args.duration, workers=args.workers,
                            senders=args.senders)
    json_path = args.json or log_dir / "db_broadcast.json"
    _report.write_json(json_path, ({**asdict(s), "loss": s.loss, "ok": s.ok} for s in steps), {**meta, **summary})
    print(f"\ntotal {time.monotonic() - started:.0f}s; text in {log_dir / 'db_broadcast.txt'}, JSON in {json_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
