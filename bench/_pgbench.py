"""Scaffolding shared by ``bench/postgres_changes.py`` and ``bench/rls.py``.

Both run one replicator (``manage.py replicate --no-broadcasts`` on a slot of their own) and one
daphne server (``manage.py runserver``) as subprocesses, each wrapped by ``_pgcount.py`` so that its
PostgreSQL statements and round trips are counted per connection; subscribers and the writer are
``_pgload.py`` processes configured through a JSON file (never on the command line). This module
owns: the processes and their CPU accounting, slots (every slot whose name starts with the run's
slot is dropped at the end), the writer's steps, waiting for deliveries, latency and duplicate
gathering, the verdict of a step (``Delivery.failures``) and the common ``main`` skeleton.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import _cpu  # noqa: E402
import _loadgen as lg  # noqa: E402
import _pgcount  # noqa: E402
import _pgload as pl  # noqa: E402
import _report  # noqa: E402
import broadcast as bc  # noqa: E402

HOST = "127.0.0.1"
UNBOUNDED_IDS = 1 << 60
RATE_TOLERANCE = 0.01  # a fixed-rate step passes only if the writer achieved >= 99% of its target
STOP_LINE = re.compile(r"stopped after (\d+) changes; (\d+) row level security queries for (\d+) runs")
fmt = _report.fmt


class BenchError(bc.BenchError):
    pass


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


postgres_pids = _report.postgres_pids


def residue_count(id_base: int, rows: int, mod: int, residue: int) -> int:
    """How many of the ids ``id_base .. id_base + rows - 1`` are ``residue`` modulo ``mod``."""
    first = id_base + (residue - id_base) % mod
    return 0 if first >= id_base + rows else (id_base + rows - 1 - first) // mod + 1


def rates_text(rates: list[float]) -> str:
    """``--rates`` as the benches print them: 0 is ``max``."""
    return " ".join("max" if r == 0 else f"{r:g}" for r in rates)


def cpu_header(keys: tuple[str, ...]) -> str:
    return " ".join(f"{k:>6}" for k in keys)


def cpu_cells(cpu: dict[str, float], keys: tuple[str, ...]) -> str:
    """A step's CPU % per group, in the columns of ``cpu_header(keys)``."""
    return " ".join(f"{cpu.get(k, 0):>6.0f}" for k in keys)


class Proc(bc.Worker):
    """A ``_pgload.py`` process (``sub`` worker or ``writer``) driven by JSON lines.

    Its configuration goes through a file (``@path`` on the command line): thousands of tokens or
    users do not fit in an argument list.
    """

    def __init__(self, index: int, mode: str, cfg: dict[str, Any], log: Any, env: dict[str, str],
                 cfg_dir: Path) -> None:
        self.index = index
        path = cfg_dir / f"cfg-{mode}-{index}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(cfg))
        self.proc = bc.spawn([sys.executable, str(BENCH_DIR / "_pgload.py"), mode, f"@{path}"],
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
class Delivery:
    """What every step measures; ``failures()`` is the one verdict both benches print and use."""

    label: str
    rate: float  # target changes/s, 0 = as fast as the writer can
    duration: float = 0.0  # scheduled seconds of writing (fixed-rate steps)
    rows: int = 0
    write_rate: float = 0.0  # achieved: rows over the scheduled time, or over the time actually taken if later
    rows_per_commit: float = 0.0
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None
    receivers: int = 0
    expected: int = 0
    received: int = 0  # frames counted, duplicates included
    duplicates: int = 0  # a change a socket had already received (or an older one after it)
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float = 0.0
    first_s: float | None = None  # first and last receipt, seconds after the first commit
    last_s: float | None = None
    deliveries_per_s: float = 0.0
    lag_s: float | None = None
    caught_up: bool = False
    ended_s: float | None = None  # when the bench stopped waiting, seconds after the writes
    end_reason: str = ""  # all delivered | drain limit | quiet after catch-up
    p99_bound_ms: float = 100.0
    cpu: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def loss(self) -> int:
        return max(0, self.expected - (self.received - self.duplicates))

    @property
    def on_rate(self) -> bool:
        return self.rate == 0 or self.write_rate >= (1 - RATE_TOLERANCE) * self.rate

    def failures(self, bound_ms: float | None = None) -> list[str]:
        """Why the step does not pass (empty: it passes): loss, duplicates, writer rate, p99 over ``bound_ms``."""
        bound = self.p99_bound_ms if bound_ms is None else bound_ms
        out = []
        if self.received == 0 or self.loss:
            out.append(f"loss {self.loss:,}")
        if self.duplicates:
            out.append(f"{self.duplicates:,} duplicates")
        if not self.on_rate:
            out.append(f"writer {self.write_rate:,.0f}/s < 99% of {self.rate:,.0f}/s")
        if self.p99_ms is None or self.p99_ms > bound:
            out.append(f"p99 {fmt(self.p99_ms, '.1f')} > {bound:g} ms")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def verdict(self) -> str:
        reasons = self.failures()
        return "PASS" if not reasons else f"FAIL ({', '.join(reasons)})"

    def record(self) -> dict[str, Any]:
        """The step as one JSON object (``bench/_report.py``)."""
        from dataclasses import asdict

        return {**asdict(self), "loss": self.loss, "on_rate": self.on_rate, "ok": self.ok,
                "failures": self.failures()}


# --- the bench -----------------------------------------------------------------------------


class Bench:
    """One run's database objects and processes; subclasses add the table and the steps."""

    slot_prefix = "bench_pg_"
    layer_prefix = "rtbenchpg"

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        import psycopg

        self.args = args
        self.log_dir = log_dir
        self.tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.slot = f"{self.slot_prefix}{self.tag}"
        self.prefix = f"{self.layer_prefix}{os.getpid()}"
        self.env = dict(env, REALTIME_LAYER_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        # The run's own publication, named after its slot; the server and replicator take it from the environment.
        args.publication = self.slot
        self.env["REALTIME_PUBLICATION"] = args.publication
        self.dsn = self.env["DATABASE_URL"]
        self.pg = psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench admin")
        self.anon = lg.mint_jwt(self.env["JWT_SECRET"], "anon")
        self.path = f"/realtime/v1/websocket?apikey={self.anon}&vsn=2.0.0"
        self.redis_pid = bc.redis_pid()
        self.replicator: subprocess.Popen[bytes] | None = None
        self.replicator_log: Path | None = None
        self.replicator_counts: Path | None = None
        self.replicator_starts = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.server_counts: Path | None = None
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
        self.publication_created = ""
        self.tables: list[str] = []  # public tables this run created
        self.spy_pids: set[int] = set()
        self.notes: list[str] = []
        self.steps: list[Any] = []  # the subclass's steps, in order

    # --- database ---------------------------------------------------------

    def sql(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cursor = self.pg.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def ensure_roles(self) -> None:
        if not self.sql("SELECT 1 FROM pg_roles WHERE rolname = 'anon'"):
            print("  role anon missing: running manage.py migrate", flush=True)
            subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO, env=self.env,
                           check=True, timeout=180, stdout=subprocess.DEVNULL)

    def _owner_gone(self, name: str) -> bool:
        pid = name[len(self.slot_prefix):].split("_", 1)[0]
        return pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()

    def drop_stale(self) -> None:
        """Slots and publications of earlier runs of this bench whose process is gone."""
        from psycopg import sql

        for name, active in self.sql("SELECT slot_name, active FROM pg_replication_slots WHERE slot_name LIKE %s "
                                     "AND database = current_database()", (self.slot_prefix + "%",)):
            if not active and self._owner_gone(name):
                with contextlib.suppress(Exception):
                    self.sql("SELECT pg_drop_replication_slot(%s)", (name,))
                    print(f"  dropped stale slot {name} of a previous run", flush=True)
        for (name,) in self.sql("SELECT pubname FROM pg_publication WHERE pubname LIKE %s", (self.slot_prefix + "%",)):
            if self._owner_gone(name):
                with contextlib.suppress(Exception):
                    self.sql(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
                    print(f"  dropped stale publication {name} of a previous run", flush=True)

    def create_table(self, table: str, columns: str) -> None:
        """(Re)create ``public.<table>`` with ``columns`` (SQL text of this module's callers, never input);
        it is dropped at the end unless ``--keep-table``."""
        from psycopg import sql

        name = sql.Identifier("public", table)
        self.sql(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        self.tables.append(table)
        self.sql(sql.SQL("CREATE TABLE {} ({})").format(name, sql.SQL(columns)))

    def create_publication(self, name: str, table: str) -> None:
        from psycopg import sql

        self.sql(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(name),
                                                                     sql.Identifier("public", table)))
        self.publication_created = name

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

    def advance_slot(self) -> None:
        """Skip the slot to the current WAL position (the replicator must be stopped)."""
        self.wait_slot_inactive()
        self.sql("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (self.slot,))

    def wait_slot_inactive(self, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while self.sql("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (self.slot,)):
            if time.monotonic() > deadline:
                raise BenchError(f"slot {self.slot} is still active")
            time.sleep(0.1)

    # --- processes --------------------------------------------------------

    def writer_config(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "payload_pad": self.args.payload_pad}

    def start_writer(self) -> None:
        with open(self.log_dir / "writer.log", "ab") as log:
            self.writer = Proc(0, "writer", self.writer_config(), log, self.env, self.log_dir)
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

    def counted(self, name: str, *manage: str) -> tuple[list[str], Path]:
        """``manage.py`` ARGS under ``_pgcount.py``; returns the command and its counts file."""
        counts = self.log_dir / f"pgcount-{name}.json"
        return [sys.executable, str(BENCH_DIR / "_pgcount.py"), str(counts), "manage.py", *manage], counts

    def start_replicator(self) -> float:
        """Spawn the replicator; returns the monotonic time at which it holds its slot.

        ``--no-broadcasts``: the bench reads no ``realtime.messages``, so the replicator opens no
        ``<slot>_messages`` slot (a slot left behind would hold WAL forever).
        """
        self.replicator_starts += 1
        self.replicator_log = self.log_dir / f"replicator-{self.replicator_starts}.log"
        cmd, self.replicator_counts = self.counted(
            f"replicator-{self.replicator_starts}", "replicate", "--slot", self.slot,
            "--publication", self.args.publication, "--no-broadcasts")
        with open(self.replicator_log, "wb") as log:
            self.replicator = bc.spawn(cmd, cpus=None, env=self.env, stdout=log, stderr=subprocess.STDOUT)
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

    def replicator_stats(self) -> tuple[int, int, int] | None:
        """(changes, RLS queries, RLS runs) from the stopped replicator's last stop line."""
        if self.replicator_log is None or not self.replicator_log.exists():
            return None
        match = None
        for match in STOP_LINE.finditer(self.replicator_log.read_text("utf-8", "replace")):
            pass
        return (int(match[1]), int(match[2]), int(match[3])) if match else None

    def reset_replicator(self, why: str) -> None:
        """Stop the replicator, skip its slot to the current WAL position and start it again."""
        print(f"  ({why}: restarting the replicator with its slot advanced to the current WAL position)", flush=True)
        self.notes.append(why)
        self.stop_replicator()
        self.advance_slot()
        self.start_replicator()

    def start_server(self) -> None:
        self.server_starts += 1
        self.server_port = bc.free_port()
        cmd, self.server_counts = self.counted(f"server-{self.server_starts}", "runserver",
                                               f"{HOST}:{self.server_port}", "--noreload")
        with open(self.log_dir / f"server-{self.server_starts}.log", "wb") as log:
            self.server = bc.spawn(cmd, cpus=None, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        bc.wait_port(self.server_port, self.server, 90)

    def stop_server(self) -> None:
        if self.server is not None:
            bc.stop(self.server, timeout=10)
            bc.report_server_log(self.log_dir / f"server-{self.server_starts}.log", f"server {self.server_starts}")
            self.server = None
        self.clean_redis()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """The server for a block; its subscriber workers and the server stopped after it, whatever happens."""
        self.start_server()
        try:
            yield
        finally:
            self.stop_workers()
            self.stop_server()

    def run_rates(self, step: Callable[[float, float, float], Delivery], row: Callable[[Any], str],
                  margin_s: float) -> list[Delivery]:
        """One ``step(rate, duration, drain_limit)`` per ``--rates`` (0 = the max step, with its own duration
        and drain limit), each printed with ``row`` and kept in ``self.steps``; the steps left when fewer
        than ``margin_s`` seconds of the time budget remain are skipped."""
        done: list[Delivery] = []
        for rate in self.args.rates:
            if time.monotonic() > self.args.deadline - margin_s:
                print("  (time budget nearly spent: skipping the remaining steps)", flush=True)
                break
            is_max = rate == 0
            st = step(rate, self.args.max_duration if is_max else self.args.duration,
                      self.args.drain_limit_max if is_max else self.args.drain_limit)
            self.steps.append(st)
            done.append(st)
            print("  " + row(st), flush=True)
        return done

    def db_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """The statements and round trips the server and the replicator have sent so far, per connection."""
        return {"server": _pgcount.read(str(self.server_counts)) if self.server_counts else {},
                "replicator": _pgcount.read(str(self.replicator_counts)) if self.replicator_counts else {}}

    def clean_redis(self) -> None:
        bc.delete_redis_keys(self.env.get("REDIS_URL"), [self.prefix])

    def log_tail(self, path: Path | None, lines: int = 12) -> str:
        if path is None or not path.exists():
            return ""
        text = path.read_bytes()[-4000:].decode("utf-8", "replace").splitlines()[-lines:]
        return "\n" + "\n".join("    " + line for line in text)

    def start_workers(self, configs: list[dict[str, Any]], log_name: str) -> int:
        """One ``sub`` process per config; waits until all have joined; returns the sockets joined."""
        base = {"host": HOST, "port": self.server_port, "path": self.path, "batch": self.args.join_batch,
                "timeout": 60, "heartbeat_s": 30}
        with open(self.log_dir / log_name, "ab") as log:
            for i, cfg in enumerate(configs):
                self.workers.append(Proc(i, "sub", {**base, **cfg}, log, self.env, self.log_dir))
        total = sum(pl.socket_count(cfg) for cfg in configs)
        deadline = time.monotonic() + 90 + total / 10
        pending = list(self.workers)
        while pending:
            if time.monotonic() > deadline:
                raise BenchError("subscribers did not finish joining in time")
            for w in list(pending):
                info = w.read(0.2)
                if info is not None:
                    w.info = info
                    pending.remove(w)
        errors = [e for w in self.workers for e in w.info.get("errors", [])]
        if errors:
            print(f"  join errors: {errors[:3]}", flush=True)
        return sum(int(w.info.get("joined", 0)) for w in self.workers)

    def stop_workers(self) -> None:
        for w in self.workers:
            w.quit()
        self.workers = []

    def worker_counters(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for w in self.workers:
            for key, value in w.rpc({"cmd": "status"})["counters"].items():
                totals[key] = totals.get(key, 0) + int(value)
        return totals

    # --- measurements -----------------------------------------------------

    def cpu_groups(self) -> dict[str, list[int]]:
        pg_pids = postgres_pids()
        repl_backend = self.backend_pid(f"realtime replicate {self.slot}")
        return {
            "server": [self.server.pid] if self.server else [],
            "repl": [self.replicator.pid] if self.replicator else [],
            "replPG": [repl_backend] if repl_backend else [],
            "writPG": [self.writer_backend] if self.writer_backend else [],
            "pg": [p for p in pg_pids if p not in (repl_backend, self.writer_backend)],
            "redis": [self.redis_pid] if self.redis_pid else [],
            "subs": [w.proc.pid for w in self.workers],
            "writer": [self.writer.proc.pid] if self.writer else [],
        }

    def cpu_snapshot(self) -> dict[str, Any]:
        per_pid = {name: _cpu.cpu_by_pid(pids) for name, pids in self.cpu_groups().items()}
        ours = {os.getpid(), *postgres_pids(), *(p.pid for p in bc._children if p.pid not in self.spy_pids)}
        if self.redis_pid:
            ours.add(self.redis_pid)
        return {"wall": time.monotonic(), "groups": per_pid, "userland": _cpu.userland_cpu(), "ours": ours,
                "busy": _cpu.core_busy_seconds(set(range(os.cpu_count() or 1)))}

    @staticmethod
    def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        """% of one core per group over the interval (processes that ended in between are left out)."""
        wall = max(1e-6, b["wall"] - a["wall"])
        out = {}
        for name, after in b["groups"].items():
            before = a["groups"].get(name, {})
            out[name] = 100 * sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()) / wall
        out["others"] = 100 * _cpu.foreign_cpu(a["userland"], b["userland"], a["ours"] | b["ours"]) / wall
        if a["busy"] is not None and b["busy"] is not None:
            out["machine"] = 100 * (b["busy"] - a["busy"]) / wall / (os.cpu_count() or 1)
        return out

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

    def write(self, st: Delivery, step_id: int, id_base: int, rows: int = 0, max_batch: int | None = None,
              k_mod: int = 0) -> dict[str, Any]:
        """Run the writer for one step: ``st.rate`` changes/s for ``st.duration`` s, or ``rows`` as fast as it can.

        Ids run from ``id_base`` up (never reused); with ``k_mod`` the ``k`` column is ``id % k_mod``.
        """
        assert self.writer is not None
        reply = self.writer.expect({"cmd": "run", "step": step_id, "rate": st.rate, "duration": st.duration,
                                    "rows": rows, "id_base": id_base, "id_space": UNBOUNDED_IDS,
                                    "truncate_first": False, "tick_ms": self.args.tick_ms, "k_mod": k_mod,
                                    "max_batch": max_batch or self.args.max_batch}, st.duration + 600)
        self.next_id = max(self.next_id, id_base + int(reply["sent"]))
        st.rows = int(reply["sent"])
        if st.rate:
            # On schedule, the last statement starts 1/rate before the end of the scheduled time; a
            # writer that starts it later achieved less than its target (its commit time is latency).
            taken = float(reply.get("last_start_s", reply["wall"])) + 1 / st.rate
            st.write_rate = st.rows / max(taken, st.duration, 1e-6)
        else:
            st.write_rate = st.rows / max(float(reply["wall"]), 1e-6)
        st.rows_per_commit = float(reply["rows_per_commit"])
        st.commit_p50_ms, st.commit_p99_ms = reply["commit_p50_ms"], reply["commit_p99_ms"]
        return reply

    def wait_delivered(
        self, step_id: int, expected: int, marker_lsn: int, written: float, drain_limit: float,
        st: Delivery | None = None,
    ) -> float | None:
        """Poll the workers until a step's ``expected`` deliveries arrived and the slot passed its marker.

        Gives up ``drain_limit`` s after the writes, or ``--settle`` s after the
        last delivery once the replicator has caught up (the server may still be
        delivering then: a late row counts as lost). Returns when it caught up
        (monotonic), or None if it never did; records in ``st`` when and why it stopped.
        """
        assert self.server is not None
        caught_up_at = None
        last, last_change = -1, time.monotonic()
        reason = ""
        while True:
            now = time.monotonic()
            if caught_up_at is None and self.confirmed_lsn() > marker_lsn:
                caught_up_at = now
            got = sum(int(w.rpc({"cmd": "count", "step": step_id})["recv"]) for w in self.workers)
            if got != last:
                last, last_change = got, now
            if got >= expected and caught_up_at is not None:
                reason = "all delivered"
                break
            if now > written + drain_limit:
                reason = f"drain limit {drain_limit:g}s"
                break
            if caught_up_at is not None and now - max(last_change, caught_up_at) > self.args.settle:
                reason = f"nothing new {self.args.settle:g}s after the replicator caught up"
                break
            if self.server.poll() is not None:
                raise BenchError(f"server exited with code {self.server.returncode}")
            if self.replicator is not None and self.replicator.poll() is not None:
                raise BenchError(f"replicator exited: {self.log_tail(self.replicator_log)}")
            time.sleep(0.02)
        if st is not None:
            st.ended_s, st.end_reason = time.monotonic() - written, reason
        return caught_up_at

    def gather(self, st: Delivery, step_id: int, reply: dict[str, Any]) -> float:
        """Fill ``st``'s received, duplicates, latency and deliveries/s from the workers; returns the window (s)."""
        replies = [w.expect({"cmd": "stats", "step": step_id}, 20) for w in self.workers]
        merged = lg.merge_stats(replies, pl.NBUCKETS, pl.percentile_ms)
        st.received = merged.received
        st.duplicates = sum(int(r.get("dups", 0)) for r in replies)
        st.p50_ms, st.p99_ms, st.max_ms = merged.p50_ms, merged.p99_ms, merged.max_ms
        first_commit = int(reply["first_ns"])
        if merged.received and first_commit:
            st.first_s = (merged.first_ns - first_commit) / 1e9
            st.last_s = (merged.last_ns - first_commit) / 1e9
        last_ns = merged.last_ns or int(reply["last_ns"])
        window = max(float(reply["wall"]), (last_ns - first_commit) / 1e9, 1e-6)
        st.deliveries_per_s = (st.received - st.duplicates) / window
        return window

    # --- the end ------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop every process, then drop every slot named after this run's slot, the publication, the tables."""
        from psycopg import sql

        if self.writer is not None:
            self.writer.quit()
            self.writer = None
        self.stop_workers()
        self.stop_replicator()
        if self.server is not None:
            bc.stop(self.server, timeout=5)
            self.server = None
        bc.stop_all()
        with contextlib.suppress(Exception):
            for (name,) in self.sql("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                                    (self.slot.replace("_", r"\_") + "%",)):
                self.created_slots.add(name)
        for name in sorted(self.created_slots):
            try:
                self.drop_slot(name)
            except Exception as error:
                print(f"  could not drop slot {name}: {error}", flush=True)
        try:
            if self.publication_created:
                self.sql(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication_created)))
            if not self.args.keep_table:
                for table in self.tables:
                    self.sql(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", table)))
        except Exception as error:
            print(f"  could not drop the publication or tables: {error}", flush=True)
        self.clean_redis()
        left = self.sql("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                        (self.slot.replace("_", r"\_") + "%",))
        if left:
            print(f"  WARNING: slots left behind: {[r[0] for r in left]}", flush=True)
        with contextlib.suppress(Exception):
            self.pg.close()

    def problems(self) -> list[str]:
        """WARNING/ERROR lines the replicators logged."""
        lines = []
        for path in sorted(self.log_dir.glob("replicator-*.log")):
            with contextlib.suppress(OSError):
                lines += [line for line in path.read_text("utf-8", "replace").splitlines()
                          if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
        return lines


# --- main ----------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=500, help="max rows per insert statement")
    p.add_argument("--tick-ms", type=float, default=5.0, help="writer batching interval at fixed rates (ms)")
    p.add_argument("--payload-pad", type=int, default=16, help="bytes of padding in each row's payload")
    p.add_argument("--workers", type=int, default=2, help="subscriber processes (default 2)")
    p.add_argument("--join-batch", type=int, default=20, help="joins in flight per subscriber process")
    p.add_argument("--keep-table", action="store_true", help="leave the bench's table in place at the end")
    p.add_argument("--log-dir", type=Path, help="logs, configs, counts and results (default: a temp dir)")
    p.add_argument("--settle", type=float, default=5.0, help="once the replicator has caught up, stop waiting "
                   "for a step's deliveries after this many seconds without one (default 5; the server may "
                   "still be delivering after the slot is confirmed)")
    p.add_argument("--json", type=Path, help="where to write the JSON results (default: in the log dir)")


def add_step_args(p: argparse.ArgumentParser, defaults: dict[str, tuple[float, float]], rates: str) -> None:
    """``--rates`` and the step lengths and drain limits of both benches; ``defaults`` gives each
    (``duration``, ``max_duration``, ``max_rows``, ``drain_limit``, ``drain_limit_max``) as
    (full run, ``--quick``), ``rates`` the default rates as the help prints them."""
    def default(name: str) -> str:
        full, quick = defaults[name]
        return f"(default {full:g}; quick: {quick:g})"

    p.add_argument("--rates", type=float, nargs="+", help=f"target changes/s per step, 0 = max (default {rates})")
    p.add_argument("--duration", type=float, help=f"seconds per fixed-rate step {default('duration')}")
    p.add_argument("--max-duration", type=float, help=f"seconds of writing in the max step {default('max_duration')}")
    p.add_argument("--max-rows", type=int, help=f"stop the max step after this many rows {default('max_rows')}")
    p.add_argument("--drain-limit", type=float, help="max seconds to wait for a fixed-rate step's deliveries "
                   + default("drain_limit"))
    p.add_argument("--drain-limit-max", type=float, help=f"the same for the max step {default('drain_limit_max')}")


def step_defaults(args: argparse.Namespace, defaults: dict[str, tuple[float, float]], rates: list[float]) -> None:
    """Fill in what ``add_step_args`` left unset (full run or ``--quick``); the max step (0) runs last."""
    for name, (full, quick) in defaults.items():
        setattr(args, name, getattr(args, name) or (quick if args.quick else full))
    args.rates = sorted(args.rates if args.rates is not None else rates, key=lambda r: (r == 0, r))


def run(name: str, args: argparse.Namespace, make: Callable[[dict[str, str], Path], Bench],
        body: Callable[[Bench], None], report: Callable[[Bench | None, Path], tuple[list[str], list[dict[str, Any]], dict[str, Any]]]) -> int:
    """The skeleton of both benches: time budget, bench object, body, cleanup whatever happens, report.

    ``report`` returns the summary's text lines, one JSON object per step and the summary object;
    the text goes to stdout and ``<log_dir>/<name>.txt``, the JSON to ``<log_dir>/<name>.json``.
    """
    started, _, log_dir = bc.begin_run(args, name, 10)
    bench: Bench | None = None

    def cleanup() -> None:
        if bench is None:
            bc.stop_all()
            return
        bench.cleanup()
        problems = bench.problems()
        if problems:
            print(f"  replicator logged {len(problems)} warning(s)/error(s), e.g. {problems[0][:200]}", flush=True)

    with bc.guarded_run(cleanup) as outcome:
        bench = make(bc.service_env(), log_dir)
        print(f"server code: {bc.describe_tree(REPO)}; cpus={os.cpu_count()} ({_report.cpu_model()}); slot "
              f"{bench.slot}; publication {args.publication}; layer prefix {bench.prefix}; logs in {log_dir}",
              flush=True)
        body(bench)
    code = outcome.code
    lines, steps, summary = report(bench, log_dir)
    if bench is not None:
        lines += [f"  note: {note}" for note in bench.notes]
    text = "\n".join(lines)
    print(text, flush=True)
    (log_dir / f"{name}.txt").write_text(text + "\n")
    json_path = args.json or log_dir / f"{name}.json"
    meta = _report.run_meta(name, quick=args.quick, exit_code=code)
    _report.write_json(json_path, steps, {**meta, **summary})
    print(f"\ntotal {time.monotonic() - started:.0f}s; text in {log_dir / f'{name}.txt'}, JSON in {json_path}; "
          f"logs in {log_dir}")
    return code
