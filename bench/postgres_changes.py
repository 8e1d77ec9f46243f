"""postgres_changes benchmark: commit-to-client latency, loss and throughput of INSERT changes.

The script recreates ``public.bench_rows (id bigint primary key, payload text,
sent_ns bigint)``, adds it to the publication, and runs one replicator
(``manage.py replicate`` on a slot of its own, dropped at the end) and one
daphne server (``manage.py runserver``, restarted for each subscriber count) as
subprocesses. Subscribers are held by load-generator processes
(``bench/_pgload.py sub``) and rows are written by another process
(``bench/_pgload.py writer``), so no client work shares the server's or the
replicator's interpreter.

For each subscriber count (1 and 100 unfiltered; 1,000 sockets that each filter
``id=eq.N`` on a different N, with the inserted ids cycling over those N so each
change matches exactly one socket) the writer inserts at 100 and 1,000
changes/s and then as fast as it can, for a fixed time per step. Every step
reports latency percentiles (receipt minus ``sent_ns``, the writer's clock just
before the statement that commits the row), delivered vs expected, the
end-to-end change rate and the CPU used by every process involved.

Before that, two ceilings over one pre-written batch of rows: how fast this
PostgreSQL drains the batch through a pgoutput slot with nothing downstream
(``pg_logical_slot_get_binary_changes`` + ``count(*)``), and how fast the
replicator decodes and publishes the same backlog (from the moment it holds its
slot until ``confirmed_flush_lsn`` passes the last row).

Usage::

    .venv/bin/python bench/postgres_changes.py --quick
    .venv/bin/python bench/postgres_changes.py
    .venv/bin/python bench/postgres_changes.py --subs 100 --rates 1000 --duration 20 --profile 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import _loadgen as lg  # noqa: E402
import _pgload as pl  # noqa: E402
import broadcast as bc  # noqa: E402

HOST = "127.0.0.1"
TABLE = "bench_rows"
SLOT_PREFIX = "bench_pgc_"
FILTER_BASE = 1
UNBOUNDED_IDS = 1 << 60
P50_TARGET_MS = 15.0
P99_TARGET_MS = 100.0
TARGET_RATE = 1000
TARGET_SUBS = 100
REPLICATOR_TARGET = 10_000.0


class BenchError(bc.BenchError):
    pass


# --- small helpers --------------------------------------------------------------------


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(entry))
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += bc.cpu_seconds(pid)
    return total


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if value == float("inf"):
        return f">{pl.MID_END_US / 1000 + pl.COARSE_US * pl.COARSE_N / 1000:.0f}"
    return format(value, spec)


class Proc(bc.Worker):
    """A ``_pgload.py`` process driven by JSON lines (``sub`` worker or ``writer``)."""

    def __init__(self, index: int, mode: str, cfg: dict[str, Any], log: Any, env: dict[str, str]) -> None:
        self.index = index
        self.proc = bc.spawn([sys.executable, str(BENCH_DIR / "_pgload.py"), mode, json.dumps(cfg)],
                             cpus=None, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.buf = b""
        self.info: dict[str, Any] = {}

    def expect(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = self.rpc(cmd, timeout)
        if "error" in reply:
            raise BenchError(f"{cmd['cmd']}: {reply['error']}")
        return reply


# --- results ---------------------------------------------------------------------------


@dataclass
class Step:
    subs: int
    filtered: bool
    label: str
    rate: float
    rows: int = 0
    write_rate: float = 0.0
    rows_per_commit: float = 0.0
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None
    receivers: int = 0
    expected: int = 0
    received: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float = 0.0
    changes_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    repl_rate: float | None = None
    lag_s: float | None = None
    caught_up: bool = False
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    misrouted: int = 0
    profiled: bool = False
    note: str = ""

    @property
    def loss(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def ok(self) -> bool:
        return self.received > 0 and self.loss == 0 and self.p99_ms is not None and self.p99_ms <= P99_TARGET_MS


@dataclass
class Ceiling:
    rows: int = 0
    insert_rate: float = 0.0
    pgoutput_messages: int = 0
    pgoutput_s: float | None = None
    repl_s: float | None = None
    repl_total_s: float | None = None
    repl_cpu_pct: float | None = None
    repl_backend_cpu_pct: float | None = None
    redis_cpu_pct: float | None = None
    error: str | None = None

    @property
    def pgoutput_rate(self) -> float | None:
        return self.rows / self.pgoutput_s if self.pgoutput_s else None

    @property
    def repl_rate(self) -> float | None:
        return self.rows / self.repl_s if self.repl_s else None


# --- the bench -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        import psycopg

        self.args = args
        self.log_dir = log_dir
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.slot = f"{SLOT_PREFIX}{tag}"
        self.ceiling_slot = f"{SLOT_PREFIX}{tag}_ceil"
        self.prefix = f"rtbenchpg{os.getpid()}"
        self.env = dict(env, REALTIME_LAYER_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        self.dsn = self.env["DATABASE_URL"]
        self.pg = psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench admin")
        self.anon = lg.mint_jwt(self.env["JWT_SECRET"], "anon")
        self.path = f"/realtime/v1/websocket?apikey={self.anon}&vsn=2.0.0"
        self.redis_pid = bc.redis_pid()
        self.replicator: subprocess.Popen[bytes] | None = None
        self.replicator_log: Path | None = None
        self.replicator_starts = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.server_port = 0
        self.server_starts = 0
        self.writer: Proc | None = None
        self.writer_backend = 0
        self.workers: list[Proc] = []
        self.step_id = 0
        self.marker_id = 0
        self.next_id = 1
        self.last_marker_lsn = 0
        self.created_slots: set[str] = set()
        self.table_created = False
        self.profiles: list[str] = []
        self.spy_pids: set[int] = set()
        self.notes: list[str] = []

    # --- database ---------------------------------------------------------

    def sql(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cursor = self.pg.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def ensure_roles(self) -> None:
        if not self.sql("SELECT 1 FROM pg_roles WHERE rolname = 'anon'"):
            print("  role anon missing: running manage.py migrate", flush=True)
            subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO, env=self.env,
                           check=True, timeout=180, stdout=subprocess.DEVNULL)

    def drop_stale_slots(self) -> None:
        for name, active, pid_text in self.sql(
            "SELECT slot_name, active, split_part(slot_name, '_', 3) FROM pg_replication_slots WHERE slot_name LIKE %s",
            (SLOT_PREFIX + "%",),
        ):
            if active or not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            if Path(f"/proc/{pid_text}").exists():
                continue
            with contextlib.suppress(Exception):
                self.sql("SELECT pg_drop_replication_slot(%s)", (name,))
                print(f"  dropped stale slot {name} of a previous run", flush=True)

    def setup_table(self) -> None:
        from psycopg import sql

        publication = sql.Identifier(self.args.publication)
        table = sql.Identifier("public", TABLE)
        if not self.sql("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.args.publication,)):
            self.sql(sql.SQL("CREATE PUBLICATION {}").format(publication))
        self.sql(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        self.sql(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, payload text, sent_ns bigint)").format(table))
        self.table_created = True
        self.sql(sql.SQL("GRANT SELECT ON {} TO anon").format(table))
        self.sql(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(publication, table))

    def create_slot(self, name: str) -> None:
        self.sql("SET statement_timeout = '60s'")
        try:
            self.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        finally:
            self.sql("SET statement_timeout = 0")
        self.created_slots.add(name)

    def drop_slot(self, name: str, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            rows = self.sql("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,))
            if not rows:
                self.created_slots.discard(name)
                return
            if not rows[0][0]:
                self.sql("SELECT pg_drop_replication_slot(%s)", (name,))
                self.created_slots.discard(name)
                return
            if time.monotonic() > deadline:
                raise BenchError(f"slot {name} is still active")
            time.sleep(0.2)

    def confirmed_lsn(self) -> int:
        rows = self.sql("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
        return lsn_int(rows[0][0]) if rows and rows[0][0] else 0

    def backend_pid(self, application_name: str) -> int:
        rows = self.sql("SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY backend_start DESC LIMIT 1",
                        (application_name,))
        return int(rows[0][0]) if rows else 0

    # --- processes --------------------------------------------------------

    def start_writer(self) -> None:
        log = open(self.log_dir / "writer.log", "ab")
        self.writer = Proc(0, "writer", {"dsn": self.dsn, "payload_pad": self.args.payload_pad}, log, self.env)
        log.close()
        info = self.writer.read(30)
        if not info or not info.get("ready"):
            raise BenchError(f"writer did not start: {info}")
        self.writer_backend = int(info["backend_pid"])

    def marker(self) -> int:
        assert self.writer is not None
        self.marker_id -= 1
        reply = self.writer.expect({"cmd": "marker", "id": self.marker_id}, 30)
        self.last_marker_lsn = lsn_int(reply["lsn"])
        return self.last_marker_lsn

    def start_replicator(self) -> float:
        """Spawn the replicator; returns the monotonic time at which it holds its slot."""
        self.replicator_starts += 1
        self.replicator_log = self.log_dir / f"replicator-{self.replicator_starts}.log"
        log = open(self.replicator_log, "wb")
        cmd = [sys.executable, "manage.py", "replicate", "--slot", self.slot, "--publication", self.args.publication]
        self.replicator = bc.spawn(cmd, cpus=None, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.replicator.poll() is not None:
                raise BenchError(f"replicator exited with code {self.replicator.returncode}: {self.log_tail(self.replicator_log)}")
            if b"active: streaming slot" in self.replicator_log.read_bytes():
                return time.monotonic()
            time.sleep(0.01)
        raise BenchError("replicator did not become active within 60s")

    def stop_replicator(self) -> None:
        if self.replicator is not None:
            bc.stop(self.replicator, timeout=15)
            self.replicator = None

    def reset_replicator(self, why: str) -> None:
        """Stop the replicator, skip its slot to the current WAL position and start it again."""
        print(f"  ({why}: restarting the replicator with its slot advanced to the current WAL position)", flush=True)
        self.notes.append(why)
        self.stop_replicator()
        self.wait_slot_inactive()
        self.sql("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (self.slot,))
        self.start_replicator()

    def wait_slot_inactive(self, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while self.sql("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (self.slot,)):
            if time.monotonic() > deadline:
                raise BenchError(f"slot {self.slot} is still active")
            time.sleep(0.1)

    def start_server(self) -> None:
        self.server_starts += 1
        self.server_port = bc.free_port()
        log = open(self.log_dir / f"server-{self.server_starts}.log", "wb")
        cmd = [sys.executable, "manage.py", "runserver", f"{HOST}:{self.server_port}", "--noreload"]
        self.server = bc.spawn(cmd, cpus=None, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        bc.wait_port(self.server_port, self.server, 90)

    def stop_server(self) -> None:
        if self.server is not None:
            bc.stop(self.server, timeout=10)
            bc.report_server_log(self.log_dir / f"server-{self.server_starts}.log", f"server {self.server_starts}")
            self.server = None
        self.clean_redis()

    def clean_redis(self) -> None:
        bc.delete_redis_keys(self.env.get("REDIS_URL"), [self.prefix])

    def log_tail(self, path: Path | None, lines: int = 12) -> str:
        if path is None or not path.exists():
            return ""
        text = path.read_bytes()[-4000:].decode("utf-8", "replace").splitlines()[-lines:]
        return "\n" + "\n".join("    " + line for line in text)

    def start_workers(self, n: int, filtered: bool) -> tuple[int, set[int]]:
        k = max(1, min(self.args.workers, n))
        log = open(self.log_dir / f"subs-{n}.log", "ab")
        cfg = {"host": HOST, "port": self.server_port, "path": self.path, "batch": self.args.join_batch,
               "timeout": 60, "heartbeat_s": 30}
        ids = list(range(FILTER_BASE, FILTER_BASE + n))
        for i in range(k):
            if filtered:
                part = ids[i::k]
                wcfg = dict(cfg, count=len(part), filter_ids=part)
            else:
                wcfg = dict(cfg, count=n // k + (1 if i < n % k else 0), filter_ids=None)
            self.workers.append(Proc(i, "sub", wcfg, log, self.env))
        log.close()
        deadline = time.monotonic() + 90 + n / 10
        pending = list(self.workers)
        while pending:
            if time.monotonic() > deadline:
                raise BenchError("subscribers did not finish joining in time")
            for w in list(pending):
                info = w.read(0.2)
                if info is not None:
                    w.info = info
                    pending.remove(w)
        joined = sum(int(w.info.get("joined", 0)) for w in self.workers)
        joined_ids = {int(i) for w in self.workers for i in w.info.get("joined_ids", [])}
        errors = [e for w in self.workers for e in w.info.get("errors", [])]
        if errors:
            print(f"  join errors: {errors[:3]}", flush=True)
        return joined, joined_ids

    def stop_workers(self) -> None:
        for w in self.workers:
            w.quit()
        self.workers = []

    # --- measurements -----------------------------------------------------

    def cpu_snapshot(self) -> dict[str, Any]:
        pg_pids = postgres_pids()
        repl_backend = self.backend_pid(f"realtime replicate {self.slot}")
        groups = {
            "server": [self.server.pid] if self.server else [],
            "repl": [self.replicator.pid] if self.replicator else [],
            "replPG": [repl_backend] if repl_backend else [],
            "writPG": [self.writer_backend] if self.writer_backend else [],
            "pg": [p for p in pg_pids if p not in (repl_backend, self.writer_backend)],
            "redis": [self.redis_pid] if self.redis_pid else [],
            "subs": [w.proc.pid for w in self.workers],
            "writer": [self.writer.proc.pid] if self.writer else [],
        }
        per_pid: dict[str, dict[int, float]] = {}
        for name, pids in groups.items():
            per_pid[name] = {}
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    per_pid[name][pid] = bc.cpu_seconds(pid)
        ours = {os.getpid(), *pg_pids, *(p.pid for p in bc._children if p.pid not in self.spy_pids)}
        if self.redis_pid:
            ours.add(self.redis_pid)
        return {"wall": time.monotonic(), "groups": per_pid, "userland": bc.userland_cpu(), "ours": ours,
                "busy": bc.core_busy_seconds(set(range(os.cpu_count() or 1)))}

    @staticmethod
    def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        """% of one core per group over the interval (processes that ended in between are left out)."""
        wall = max(1e-6, b["wall"] - a["wall"])
        out = {}
        for name, after in b["groups"].items():
            before = a["groups"].get(name, {})
            out[name] = 100 * sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()) / wall
        out["others"] = 100 * bc.foreign_cpu(a["userland"], b["userland"], a["ours"] | b["ours"]) / wall
        if a["busy"] is not None and b["busy"] is not None:
            out["machine"] = 100 * (b["busy"] - a["busy"]) / wall / (os.cpu_count() or 1)
        return out

    def ceilings(self) -> Ceiling:
        """pgoutput drain rate and replicator backlog drain rate over one pre-written batch."""
        c = Ceiling(rows=self.args.ceiling_rows)
        assert self.writer is not None
        self.create_slot(self.ceiling_slot)
        self.create_slot(self.slot)
        print(f"  writing {c.rows:,} rows in {self.args.bulk_batch}-row transactions ...", flush=True)
        reply = self.writer.expect({"cmd": "run", "step": 0, "rate": 0, "rows": c.rows, "id_base": self.next_id,
                                    "id_space": UNBOUNDED_IDS, "truncate_first": True,
                                    "max_batch": self.args.bulk_batch}, 600)
        self.next_id += c.rows
        c.insert_rate = float(reply["rate"])
        end_lsn = self.marker()
        print(f"  inserted at {c.insert_rate:,.0f} rows/s; draining slot {self.ceiling_slot} through pgoutput ...", flush=True)
        self.sql("SET statement_timeout = '600s'")
        t0 = time.perf_counter()
        count = self.sql(
            "SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
            "'publication_names', %s)", (self.ceiling_slot, self.args.publication))[0][0]
        c.pgoutput_s = time.perf_counter() - t0
        self.sql("SET statement_timeout = 0")
        c.pgoutput_messages = int(count)
        self.drop_slot(self.ceiling_slot)
        print(f"  pgoutput: {c.pgoutput_messages:,} messages in {c.pgoutput_s:.2f}s; starting the replicator on the "
              "same backlog ...", flush=True)
        spawned = time.monotonic()
        active = self.start_replicator()
        spy = self.start_pyspy("replicator-backlog", self.replicator.pid if self.replicator else 0, self.args.profile_seconds) \
            if self.args.profile_backlog else None
        s0 = self.cpu_snapshot()
        deadline = active + self.args.drain_limit_backlog
        done = None
        while time.monotonic() < deadline:
            if self.confirmed_lsn() > end_lsn:
                done = time.monotonic()
                break
            if self.replicator is not None and self.replicator.poll() is not None:
                raise BenchError(f"replicator exited: {self.log_tail(self.replicator_log)}")
            time.sleep(0.01)
        s1 = self.cpu_snapshot()
        cpu = self.cpu_delta(s0, s1)
        c.repl_cpu_pct, c.repl_backend_cpu_pct, c.redis_cpu_pct = cpu["repl"], cpu["replPG"], cpu["redis"]
        if done is None:
            c.error = f"replicator did not drain {c.rows:,} rows within {self.args.drain_limit_backlog:.0f}s"
            print(f"  {c.error}", flush=True)
            self.finish_pyspy(spy, f"replicator draining the {c.rows:,}-row backlog (not finished)")
            self.reset_replicator("backlog not drained in time")
        else:
            c.repl_s = done - active
            c.repl_total_s = done - spawned
            print(f"  replicator: {c.rows:,} rows in {c.repl_s:.2f}s after taking the slot "
                  f"({c.repl_total_s:.2f}s from spawn)", flush=True)
            self.finish_pyspy(spy, f"replicator draining the {c.rows:,}-row backlog, nothing downstream "
                                   f"({c.repl_rate or 0:,.0f} rows/s)")
        return c

    def start_pyspy(self, name: str, pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path, str] | None:
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if pyspy is None or not pid:
            return None
        out = self.log_dir / f"profile-{name}.txt"
        cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
               "--format", "raw", "--output", str(out), "--nonblocking"]
        proc = bc.spawn(cmd, cpus=None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.spy_pids.add(proc.pid)
        return proc, out, name

    def finish_pyspy(self, spy: tuple[subprocess.Popen[bytes], Path, str] | None, title: str) -> None:
        if spy is None:
            return
        proc, out, name = spy
        try:
            proc.wait(self.args.profile_seconds + 60)
        except subprocess.TimeoutExpired:
            print(f"  (py-spy {name} did not finish)", flush=True)
            bc.stop(proc)
            return
        err = proc.stderr.read().decode("utf-8", "replace")[-300:] if proc.stderr else ""
        bc.stop(proc)
        if proc.returncode != 0 or not out.exists():
            print(f"  (py-spy {name} failed: {err.strip()})", flush=True)
            return
        self.profiles.append(bc.summarize_profile(out.read_text(), f"{title}; raw: {out}", top=15))

    def quiesce(self, limit: float) -> bool:
        """Wait until the slot is past the last marker and no change arrived for 0.3 s."""
        end = time.monotonic() + limit
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < end:
            caught_up = self.confirmed_lsn() > self.last_marker_lsn
            got = sum(int(w.rpc({"cmd": "count", "step": -1})["changes"]) for w in self.workers)
            now = time.monotonic()
            if got != last:
                last, stable_since = got, now
            elif caught_up and now - stable_since >= 0.3:
                return True
            time.sleep(0.05)
        return False

    def step(self, subs: int, filtered: bool, joined_ids: set[int], rate: float, duration: float,
             drain_limit: float, profile: bool) -> Step:
        assert self.writer is not None and self.server is not None
        label = f"{rate:g}" if rate else "max"
        st = Step(subs, filtered, label, rate)
        if not self.quiesce(20):
            if self.confirmed_lsn() <= self.last_marker_lsn:
                self.reset_replicator("replicator still behind before a step")
            st.note = "previous backlog not drained"
        status = [w.rpc({"cmd": "status"}) for w in self.workers]
        st.receivers = sum(int(s["open"]) for s in status)
        self.step_id += 1
        step_id = self.step_id
        if filtered:
            id_base, id_space, truncate = FILTER_BASE, subs, True
        else:
            id_base, id_space, truncate = self.next_id, UNBOUNDED_IDS, False
        spies = []
        if profile:
            secs = self.args.profile_seconds
            spies = [self.start_pyspy(f"server-{subs}-{label}", self.server.pid, secs),
                     self.start_pyspy(f"replicator-{subs}-{label}", self.replicator.pid if self.replicator else 0, secs)]
            st.profiled = True
        s0 = self.cpu_snapshot()
        t0 = time.monotonic()
        reply = self.writer.expect({"cmd": "run", "step": step_id, "rate": rate, "duration": duration,
                                    "rows": 0 if rate else self.args.max_rows,
                                    "id_base": id_base, "id_space": id_space, "truncate_first": truncate,
                                    "tick_ms": self.args.tick_ms, "max_batch": self.args.max_batch}, duration + 120)
        st.rows = int(reply["sent"])
        if not filtered:
            self.next_id += st.rows
        st.write_rate = float(reply["rate"])
        st.rows_per_commit = float(reply["rows_per_commit"])
        st.commit_p50_ms, st.commit_p99_ms = reply["commit_p50_ms"], reply["commit_p99_ms"]
        marker_lsn = self.marker()
        written = time.monotonic()
        if filtered:
            per_id, extra = divmod(st.rows, subs)
            st.expected = sum(per_id + (1 if i - FILTER_BASE < extra else 0) for i in joined_ids)
        else:
            st.expected = st.rows * st.receivers
        caught_up_at = self.wait_delivered(step_id, st.expected, marker_lsn, written, drain_limit)
        s1 = self.cpu_snapshot()
        st.wall_s = time.monotonic() - t0
        st.cpu = self.cpu_delta(s0, s1)
        window = self.gather_latency(st, step_id, reply)
        fanout = 1 if filtered else max(1, st.receivers)
        st.changes_per_s = st.received / fanout / window
        st.caught_up = caught_up_at is not None
        if caught_up_at is not None:
            st.lag_s = max(0.0, caught_up_at - written)
            st.repl_rate = st.rows / max(1e-6, caught_up_at - t0)
        status = [w.rpc({"cmd": "status"}) for w in self.workers]
        st.misrouted = sum(int(s["counters"].get("misrouted", 0)) for s in status)
        for spy in spies:
            if spy is not None:
                who = "server" if spy[2].startswith("server") else "replicator"
                self.finish_pyspy(spy, f"{who} under the {label} changes/s step, {subs} subscriber(s)"
                                       f"{' filtered' if filtered else ''} (writer {st.write_rate:,.0f}/s, "
                                       f"{st.changes_per_s:,.0f} changes/s delivered, {who} CPU "
                                       f"{st.cpu['server' if who == 'server' else 'repl']:.0f}%)")
        if not st.caught_up:
            self.reset_replicator(f"replicator had not caught up {drain_limit:.0f}s after the {label} step with {subs} subscribers")
        return st

    def wait_delivered(
        self, step_id: int, expected: int, marker_lsn: int, written: float, drain_limit: float
    ) -> float | None:
        """Poll the workers until a step's ``expected`` deliveries arrived and the slot passed its marker.

        Gives up ``drain_limit`` s after the writes, or 1.5 s after the last
        delivery once the replicator has caught up. Returns when it caught up
        (monotonic), or None if it never did.
        """
        assert self.server is not None
        caught_up_at = None
        last, last_change = -1, time.monotonic()
        while True:
            now = time.monotonic()
            if caught_up_at is None and self.confirmed_lsn() > marker_lsn:
                caught_up_at = now
            got = sum(int(w.rpc({"cmd": "count", "step": step_id})["recv"]) for w in self.workers)
            if got != last:
                last, last_change = got, now
            if got >= expected and caught_up_at is not None:
                break
            if now > written + drain_limit:
                break
            if caught_up_at is not None and now - last_change > 1.5:
                break
            if self.server.poll() is not None:
                raise BenchError(f"server exited with code {self.server.returncode}")
            if self.replicator is not None and self.replicator.poll() is not None:
                raise BenchError(f"replicator exited: {self.log_tail(self.replicator_log)}")
            time.sleep(0.02)
        return caught_up_at

    def gather_latency(self, st: Any, step_id: int, reply: dict[str, Any]) -> float:
        """Fill ``st``'s received, p50/p99/max latency and deliveries/s from the workers; returns the window (s)."""
        replies = [w.expect({"cmd": "stats", "step": step_id}, 20) for w in self.workers]
        hist = [0] * pl.NBUCKETS
        for r in replies:
            for i, count in r["hist"]:
                hist[i] += count
        st.received = sum(int(r["recv"]) for r in replies)
        st.p50_ms = pl.percentile_ms(hist, st.received, 0.50)
        st.p99_ms = pl.percentile_ms(hist, st.received, 0.99)
        st.max_ms = max([int(r["max_us"]) for r in replies] or [0]) / 1000
        last_ns = max([int(r["last_ns"]) for r in replies if r["recv"]] or [int(reply["last_ns"])])
        window = max(float(reply["wall"]), (last_ns - int(reply["first_ns"])) / 1e9, 1e-6)
        st.deliveries_per_s = st.received / window
        return window

    def run_config(self, subs: int, filtered: bool) -> list[Step]:
        steps: list[Step] = []
        self.start_server()
        try:
            started = time.monotonic()
            joined, joined_ids = self.start_workers(subs, filtered)
            kind = f"each filtering id=eq.N for N in {FILTER_BASE}..{FILTER_BASE + subs - 1}" if filtered else "unfiltered"
            print(f"\n== {subs} subscriber(s), {kind}: {joined}/{subs} subscribed in {time.monotonic() - started:.1f}s",
                  flush=True)
            if joined == 0:
                raise BenchError("no subscriber joined")
            print("  " + STEP_HEADER, flush=True)
            for rate in self.args.rates:
                if time.monotonic() > self.args.deadline - 60:
                    print("  (time budget nearly spent: skipping the remaining steps)", flush=True)
                    break
                is_max = rate == 0
                duration = self.args.max_duration if is_max else self.args.duration
                drain = self.args.drain_limit_max if is_max else self.args.drain_limit
                profile = rate == self.args.profile_rate and subs in self.args.profile
                st = self.step(subs, filtered, joined_ids, rate, duration, drain, profile)
                steps.append(st)
                print("  " + step_row(st), flush=True)
        finally:
            self.stop_workers()
            self.stop_server()
        return steps

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.quit()
            self.writer = None
        self.stop_workers()
        self.stop_replicator()
        if self.server is not None:
            bc.stop(self.server, timeout=5)
            self.server = None
        bc.stop_all()
        for name in list(self.created_slots):
            try:
                self.drop_slot(name)
            except Exception as error:
                print(f"  could not drop slot {name}: {error}", flush=True)
        if self.table_created and not self.args.keep_table:
            with contextlib.suppress(Exception):
                self.sql(f"DROP TABLE IF EXISTS public.{TABLE}")
        self.clean_redis()
        with contextlib.suppress(Exception):
            self.pg.close()


# --- output ---------------------------------------------------------------------------------

CPU_KEYS = ("server", "repl", "replPG", "pg", "redis", "subs", "writer", "writPG", "others", "machine")
STEP_HEADER = (f"{'subs':>5} {'rate':>5} {'rows':>8} {'write/s':>8} {'r/txn':>5} {'cmt p50':>7} {'expected':>9} "
               f"{'received':>9} {'loss':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'chg/s':>7} {'dlv/s':>8} "
               f"{'lag s':>6}  CPU% " + " ".join(f"{k:>6}" for k in CPU_KEYS))


def step_row(s: Step) -> str:
    cpu = " ".join(f"{s.cpu.get(k, 0):>6.0f}" for k in CPU_KEYS)
    flags = ("  *py-spy" if s.profiled else "") + (f"  misrouted={s.misrouted}" if s.misrouted else "") \
        + (f"  ({s.note})" if s.note else "") + ("" if s.caught_up else "  (replicator behind)")
    return (f"{s.subs:>5}{'f' if s.filtered else ' '}{s.label:>5} {s.rows:>8,} {s.write_rate:>8,.0f} {s.rows_per_commit:>5.0f} "
            f"{fmt(s.commit_p50_ms, '.1f'):>7} {s.expected:>9,} {s.received:>9,} {s.loss:>8,} {fmt(s.p50_ms, '.1f'):>7} "
            f"{fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>8.1f} {s.changes_per_s:>7,.0f} {s.deliveries_per_s:>8,.0f} "
            f"{fmt(s.lag_s, '.1f'):>6}       {cpu}{flags}")


def print_summary(args: argparse.Namespace, ceiling: Ceiling | None, steps: list[Step]) -> None:
    print("\n" + "=" * 120)
    print("Summary")
    if ceiling is not None:
        print(f"\n  Ceilings over {ceiling.rows:,} pre-written rows ({args.bulk_batch} rows per transaction, "
              f"inserted at {ceiling.insert_rate:,.0f} rows/s):")
        print(f"    pgoutput slot drained by PostgreSQL, nothing downstream: "
              f"{fmt(ceiling.pgoutput_rate, ',.0f')} changes/s ({ceiling.pgoutput_messages:,} messages in "
              f"{fmt(ceiling.pgoutput_s, '.2f')}s)")
        print(f"    replicator decode + publish of the same backlog:         "
              f"{fmt(ceiling.repl_rate, ',.0f')} changes/s ({fmt(ceiling.repl_s, '.2f')}s after taking the slot, "
              f"{fmt(ceiling.repl_total_s, '.2f')}s from spawn; replicator CPU {fmt(ceiling.repl_cpu_pct, '.0f')}%, "
              f"its PostgreSQL backend {fmt(ceiling.repl_backend_cpu_pct, '.0f')}%, redis {fmt(ceiling.redis_cpu_pct, '.0f')}%)"
              + (f"  {ceiling.error}" if ceiling.error else ""))
    if steps:
        print(f"\n  {'subscribers':<22} {'rate':>6} {'rows':>8} {'write/s':>8} {'expected':>10} {'delivered':>10} "
              f"{'loss':>8} {'loss %':>7} {'p50 ms':>7} {'p99 ms':>7} {'changes/s':>10} {'deliveries/s':>12} "
              f"{'repl/s':>8} {'srv CPU':>7} {'repl CPU':>8}")
        for s in steps:
            who = f"{s.subs} " + ("filtered id=eq.N" if s.filtered else "unfiltered")
            pct = 100 * s.loss / s.expected if s.expected else 0.0
            print(f"  {who:<22} {s.label:>6} {s.rows:>8,} {s.write_rate:>8,.0f} {s.expected:>10,} {s.received:>10,} "
                  f"{s.loss:>8,} {pct:>6.1f}% {fmt(s.p50_ms, '.1f'):>7} {fmt(s.p99_ms, '.1f'):>7} {s.changes_per_s:>10,.0f} "
                  f"{s.deliveries_per_s:>12,.0f} {fmt(s.repl_rate, ',.0f'):>8} {s.cpu.get('server', 0):>6.0f}% "
                  f"{s.cpu.get('repl', 0):>7.0f}%" + ("  *py-spy" if s.profiled else ""))
    print("\n  Targets:")
    target = next((s for s in steps if s.subs == TARGET_SUBS and not s.filtered and s.rate == TARGET_RATE), None)
    if target is None:
        print(f"    p50 <= {P50_TARGET_MS:g} ms and p99 <= {P99_TARGET_MS:g} ms at {TARGET_RATE:,} changes/s with "
              f"{TARGET_SUBS} subscribers: not measured in this run")
    else:
        ok = (target.p50_ms is not None and target.p99_ms is not None and target.p50_ms <= P50_TARGET_MS
              and target.p99_ms <= P99_TARGET_MS)
        print(f"    p50 <= {P50_TARGET_MS:g} ms and p99 <= {P99_TARGET_MS:g} ms at {TARGET_RATE:,} changes/s with "
              f"{TARGET_SUBS} subscribers: p50 {fmt(target.p50_ms, '.1f')} ms, p99 {fmt(target.p99_ms, '.1f')} ms, "
              f"loss {target.loss:,} -> {'PASS' if ok else 'FAIL'}" + ("" if target.loss == 0 else " (with loss)"))
    rate = ceiling.repl_rate if ceiling else None
    print(f"    >= {REPLICATOR_TARGET:,.0f} changes/s decoded, filtered and published by one replicator: "
          f"{fmt(rate, ',.0f')} changes/s -> {'PASS' if rate and rate >= REPLICATOR_TARGET else 'FAIL'}")
    if ceiling and ceiling.pgoutput_rate and rate:
        print(f"    (the replicator reaches {100 * rate / ceiling.pgoutput_rate:.0f}% of the pgoutput ceiling of this PostgreSQL)")


def print_legend() -> None:
    print("columns: subs (f = filtered), rate = target changes/s (max = as fast as the writer can), rows = rows "
          "inserted, write/s = writer's achieved rate, r/txn = rows per transaction, cmt p50 = writer's statement + "
          "commit time (ms, included in latency), expected/received/loss = deliveries (loss = not received by the end of "
          "the step: the writing time plus up to the drain limit), p50/p99/max = commit-to-client "
          "latency, chg/s = distinct changes delivered per second from first commit to last receipt, dlv/s = "
          "deliveries per second, lag s = seconds after the writer stopped until the slot passed its last row; CPU% "
          "of one core: server, repl = replicator, replPG = the replicator's PostgreSQL backend (decoding), pg = other "
          "PostgreSQL processes, redis, subs = subscriber processes, writer, writPG = writer's backend, others = "
          "every other user process (py-spy included); machine = busy time of all CPUs including kernel threads (% of all cores)", flush=True)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="postgres_changes benchmark (see module docstring).")
    p.add_argument("--quick", action="store_true", help="small run, under a minute")
    p.add_argument("--subs", type=int, nargs="*", help="subscriber counts (default 1 100 1000; quick: 1 20 100; "
                   "bare flag: ceilings only)")
    p.add_argument("--filtered-from", type=int, help="counts >= this use one id=eq.N filter per socket "
                   "(default 1000; quick: 100)")
    p.add_argument("--rates", type=float, nargs="+", help="target changes/s per step, 0 = max (default 100 1000 0)")
    p.add_argument("--duration", type=float, help="seconds per fixed-rate step (default 10; quick: 1.5)")
    p.add_argument("--max-duration", type=float, help="seconds of writing in the max step (default 5; quick: 1.5)")
    p.add_argument("--max-rows", type=int, help="stop the max step after this many rows (default 150000; quick: 10000)")
    p.add_argument("--drain-limit", type=float, help="max seconds to wait for a fixed-rate step's deliveries (default 30; quick: 5)")
    p.add_argument("--drain-limit-max", type=float, help="the same for the max step (default 60; quick: 6)")
    p.add_argument("--drain-limit-backlog", type=float, help="max seconds for the replicator to drain the backlog "
                   "(default 180; quick: 30)")
    p.add_argument("--ceiling-rows", type=int, help="rows pre-written for the ceilings (default 200000; quick: 20000)")
    p.add_argument("--bulk-batch", type=int, default=1000, help="rows per transaction of the pre-written batch")
    p.add_argument("--max-batch", type=int, default=500, help="max rows per insert statement in the steps")
    p.add_argument("--tick-ms", type=float, default=5.0, help="writer batching interval at fixed rates (ms)")
    p.add_argument("--payload-pad", type=int, default=16, help="bytes of padding in each row's payload")
    p.add_argument("--workers", type=int, default=2, help="subscriber processes (default 2)")
    p.add_argument("--join-batch", type=int, default=20, help="joins in flight per subscriber process")
    p.add_argument("--publication", default="supabase_realtime")
    p.add_argument("--profile", type=int, nargs="*", help="py-spy the server and replicator during one step at "
                   "these subscriber counts (default 100 1000; quick: none; bare flag: all)")
    p.add_argument("--profile-rate", type=float, default=0, help="the step to profile (default 0 = the max step)")
    p.add_argument("--backlog-profile", choices=("on", "off"),
                   help="py-spy the replicator while it drains the backlog (default on; quick: off)")
    p.add_argument("--profile-seconds", type=float, help="py-spy duration (default 10; quick: 1.5)")
    p.add_argument("--skip-ceilings", action="store_true", help="only the subscriber steps")
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 1800; quick: 110)")
    p.add_argument("--keep-table", action="store_true", help="leave bench_rows in place at the end")
    p.add_argument("--log-dir", type=Path, help="logs and raw profiles (default: a temp dir)")
    args = p.parse_args(argv)
    q = args.quick
    if args.subs is None:
        args.subs = [1, 20, 100] if q else [1, 100, 1000]
    args.filtered_from = args.filtered_from or (100 if q else 1000)
    args.rates = args.rates if args.rates is not None else [100, 1000, 0]
    args.rates = sorted(args.rates, key=lambda r: (r == 0, r))
    args.duration = args.duration or (1.5 if q else 10.0)
    args.max_duration = args.max_duration or (1.5 if q else 5.0)
    args.max_rows = args.max_rows or (10_000 if q else 150_000)
    args.drain_limit = args.drain_limit or (5.0 if q else 30.0)
    args.drain_limit_max = args.drain_limit_max or (6.0 if q else 60.0)
    args.drain_limit_backlog = args.drain_limit_backlog or (30.0 if q else 180.0)
    args.ceiling_rows = args.ceiling_rows or (20_000 if q else 200_000)
    args.profile_seconds = args.profile_seconds or (2.0 if q else 10.0)
    if args.profile is None:
        args.profile = [] if q else [100, 1000]
    elif not args.profile:
        args.profile = list(args.subs)
    if args.skip_ceilings and not args.subs:
        p.error("nothing to run: --skip-ceilings without subscriber counts")
    args.profile_backlog = (args.backlog_profile or ("off" if q else "on")) == "on"
    args.timeout = args.timeout or (110.0 if q else 1800.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, _, log_dir = bc.begin_run(args, "pgchanges", 10)
    steps: list[Step] = []
    ceiling: Ceiling | None = None
    bench: Bench | None = None
    code = 0
    try:
        env = bc.service_env()
        bench = Bench(args, env, log_dir)
        print(f"postgres_changes bench: subscribers={' '.join(map(str, args.subs))} (filtered from {args.filtered_from}) "
              f"rates={' '.join('max' if r == 0 else f'{r:g}' for r in args.rates)} step={args.duration:g}s "
              f"max step={args.max_duration:g}s or {args.max_rows:,} rows; ceiling rows={args.ceiling_rows:,}", flush=True)
        print(f"server code: {bc.describe_tree(REPO)}; cpus={os.cpu_count()}; slot {bench.slot}; publication "
              f"{args.publication}; layer prefix {bench.prefix}; logs in {log_dir}", flush=True)
        bench.ensure_roles()
        bench.drop_stale_slots()
        bench.setup_table()
        bench.start_writer()
        if args.skip_ceilings:
            bench.create_slot(bench.slot)
            bench.start_replicator()
        else:
            print("\n== ceilings", flush=True)
            ceiling = bench.ceilings()
        print_legend()
        for n in args.subs:
            if time.monotonic() > args.deadline - 60:
                print(f"skipping {n} subscribers: time budget spent", flush=True)
                continue
            try:
                steps += bench.run_config(n, filtered=n >= args.filtered_from)
            except (bc.BenchError, OSError, lg.HandshakeError) as error:
                code = 1
                print(f"  [{n} subscribers] ERROR: {error}", flush=True)
    except (KeyboardInterrupt, TimeoutError, SystemExit) as reason:
        code = 130
        print(f"\ninterrupted: {reason!r}", flush=True)
    except (bc.BenchError, OSError, lg.HandshakeError) as error:
        code = 1
        print(f"ERROR: {error}", flush=True)
    finally:
        signal.alarm(0)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if bench is not None:
                bench.cleanup()
            else:
                bc.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)
    print_summary(args, ceiling, steps)
    if bench is not None:
        for note in bench.notes:
            print(f"  note: {note}")
        for profile in bench.profiles:
            print("\n" + profile)
    print(f"\ntotal {time.monotonic() - started:.0f}s; logs and raw profiles in {log_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
