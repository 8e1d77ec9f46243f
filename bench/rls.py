"""Row level security benchmark: authorized postgres_changes deliveries to many sockets of few users.

The script recreates ``public.bench_rls (id bigint primary key, user_id uuid,
payload text, sent_ns bigint)`` with row level security enabled and one
policy, ``owner``: ``authenticated`` may SELECT a row only if ``user_id =
auth.uid()``. The table goes into a publication of this run's own, read by one
replicator (``manage.py replicate`` on a slot of its own) and one daphne
server (``manage.py runserver``); slot, publication and table are dropped at
the end, whatever happens.

Subscribers: 1,000 sockets (``--sockets``) held by load-generator processes
(``bench/_pgload.py sub``), spread evenly over 10 users (``--users``). Every
socket of a user joins with the very same ``authenticated`` token (same
``sub``, ``iat`` and ``exp``), so the server sees 10 distinct claim sets. Rows
are written by another process (``bench/_pgload.py writer``); row ``id``
belongs to user ``id % users``, so each change is authorized for
sockets/users sockets and must reach no other: a change a socket receives
whose ``user_id`` is not its user's is counted as a leak.

Steps: the writer inserts at rising rates (10, 40, 100, 200 changes/s, then as
fast as it can up to ``--max-rows``), a fixed time per step. The replicator is
restarted around every step, so the line it logs when it stops ("stopped
after N changes; Q row level security queries for R runs") gives that step's
visibility queries per change batch (Q / R), per change (Q / N) and changes
per batch (N / R). Each step also reports authorized deliveries/s, latency
(client receipt minus ``sent_ns``, the writer's clock just before the
statement that commits the row), delivered vs expected, leaks, and the CPU of
the server, the replicator and its PostgreSQL backends.

Baseline, measured first against the same PostgreSQL from this process: the
reference server's way, one query per socket and change. For each of
``--naive-changes`` rows and each of the sockets, in its own transaction:
``SET LOCAL ROLE authenticated``, ``set_config('request.jwt.claims', ...)``,
``SELECT EXISTS(SELECT 1 FROM public.bench_rls WHERE id = $1)``, on one
connection as fast as it goes (the fastest of ``--naive-passes`` passes
counts). Each check can yield at most one delivery, so its ceiling of
authorized deliveries/s is checks/s times the visible fraction (1 / users);
the summary compares it with the deliveries/s measured in the max step.

Targets, printed as PASS/FAIL: at most 10 visibility queries per change batch
whatever the socket count; at least 4,000 authorized deliveries/s at a step
with p99 <= 150 ms and no loss (the highest such fixed-rate step is reported;
the max step is a burst, not a sustained rate); no leaks.

Usage::

    .venv/bin/python bench/rls.py --quick
    .venv/bin/python bench/rls.py
    .venv/bin/python bench/rls.py --sockets 2000 --users 20 --rates 40 100 200 0 --duration 20
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))

import _loadgen as lg  # noqa: E402
import broadcast as bc  # noqa: E402
import postgres_changes as pc  # noqa: E402

TABLE = "bench_rls"
PREFIX = "bench_rls_"  # slot and publication names: bench_rls_<pid>_<tag>
ROLE = "authenticated"
UNBOUNDED_IDS = 1 << 60
QUERIES_PER_BATCH_TARGET = 10.0
DELIVERIES_TARGET = 4000.0
P99_TARGET_MS = 150.0
STOP_LINE = re.compile(r"stopped after (\d+) changes; (\d+) row level security queries for (\d+) runs")


class BenchError(bc.BenchError):
    pass


# --- results ---------------------------------------------------------------------------


@dataclass
class Naive:
    changes: int = 0
    sockets: int = 0
    checks: int = 0
    visible: int = 0
    seconds: float = 0.0  # the fastest pass
    passes: list[float] = field(default_factory=list)  # checks/s of every pass
    cpu_bench_pct: float = 0.0
    cpu_backend_pct: float = 0.0
    error: str | None = None

    @property
    def checks_per_s(self) -> float:
        return self.checks / self.seconds if self.seconds else 0.0

    @property
    def ceiling(self) -> float:
        """Authorized deliveries/s if every check were followed by its delivery at no cost."""
        return self.checks_per_s * self.visible / self.checks if self.checks else 0.0


@dataclass
class Step:
    label: str
    rate: float
    rows: int = 0
    write_rate: float = 0.0
    rows_per_commit: float = 0.0
    expected: int = 0
    received: int = 0
    leaked: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float = 0.0
    deliveries_per_s: float = 0.0
    lag_s: float | None = None
    caught_up: bool = False
    cpu: dict[str, float] = field(default_factory=dict)
    repl_changes: int | None = None
    rls_queries: int | None = None
    rls_runs: int | None = None
    note: str = ""

    @property
    def loss(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def queries_per_batch(self) -> float | None:
        return self.rls_queries / self.rls_runs if self.rls_queries is not None and self.rls_runs else None

    @property
    def queries_per_change(self) -> float | None:
        return self.rls_queries / self.repl_changes if self.rls_queries is not None and self.repl_changes else None

    @property
    def changes_per_batch(self) -> float | None:
        return self.repl_changes / self.rls_runs if self.repl_changes is not None and self.rls_runs else None

    @property
    def meets_latency(self) -> bool:
        return (self.received > 0 and self.loss == 0 and self.leaked == 0 and self.p99_ms is not None
                and self.p99_ms <= P99_TARGET_MS)


def mint_user_token(secret: str, sub: str, ttl_s: int) -> str:
    """One ``authenticated`` HS256 token; every socket of the user reuses it as is."""
    import jwt

    now = int(time.time())
    claims = {"aud": ROLE, "role": ROLE, "sub": sub, "iat": now, "exp": now + ttl_s}
    return str(jwt.encode(claims, secret, algorithm="HS256"))


# --- the bench -----------------------------------------------------------------------------


class Bench(pc.Bench):
    """``postgres_changes.Bench`` on an RLS table, with per-user tokens and per-step replicator stats."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        args.publication = f"{PREFIX}{tag}"
        super().__init__(args, env, log_dir)
        self.slot = f"{PREFIX}{tag}"
        self.prefix = f"rtbenchrls{os.getpid()}"
        self.env.update(REALTIME_LAYER_PREFIX=self.prefix, REALTIME_PUBLICATION=args.publication)
        self.owners = [str(uuid.uuid4()) for _ in range(args.users)]
        self.tokens = [mint_user_token(self.env["JWT_SECRET"], sub, 24 * 3600) for sub in self.owners]
        self.claims = [json.loads(_jwt_payload(token)) for token in self.tokens]
        self.joined_by_owner: dict[str, int] = {}
        self.publication_created = False
        self.rls_table_created = False
        self.steps_done: list[Step] = []

    # --- database ---------------------------------------------------------

    def drop_stale(self) -> None:
        """Slots and publications of earlier runs whose process is gone."""
        for name, active in self.sql("SELECT slot_name, active FROM pg_replication_slots WHERE slot_name LIKE %s",
                                     (PREFIX + "%",)):
            if not active and _owner_gone(name):
                with contextlib.suppress(Exception):
                    self.sql("SELECT pg_drop_replication_slot(%s)", (name,))
                    print(f"  dropped stale slot {name} of a previous run", flush=True)
        from psycopg import sql

        for (name,) in self.sql("SELECT pubname FROM pg_publication WHERE pubname LIKE %s", (PREFIX + "%",)):
            if _owner_gone(name):
                with contextlib.suppress(Exception):
                    self.sql(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
                    print(f"  dropped stale publication {name} of a previous run", flush=True)

    def setup_table(self) -> None:
        from psycopg import sql

        from realtime.dbsetup import SETUP_SQL

        self.sql(SETUP_SQL)
        table = sql.Identifier("public", TABLE)
        self.sql(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        self.rls_table_created = True
        self.sql(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, user_id uuid, payload text, sent_ns bigint)")
                 .format(table))
        self.sql(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        self.sql(sql.SQL("CREATE POLICY owner ON {} FOR SELECT TO {} USING (user_id = auth.uid())")
                 .format(table, sql.Identifier(ROLE)))
        self.sql(sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(ROLE)))
        self.sql(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(self.args.publication), table))
        self.publication_created = True

    def naive(self, changes: int, sockets: int, passes: int) -> Naive:
        """The reference's check: one transaction and query per socket and change, on one connection.

        The fastest of ``passes`` passes counts: the baseline gets the benefit of any noise.
        """
        import psycopg
        from psycopg import sql

        result = Naive(changes=changes, sockets=sockets)
        ids = list(range(1, changes + 1))
        table = sql.Identifier("public", TABLE)
        self.sql(sql.SQL("INSERT INTO {} (id, user_id, payload, sent_ns) "
                         "SELECT g, (%s::uuid[])[1 + mod(g, %s)], 'naive', 0 FROM unnest(%s::bigint[]) g").format(table),
                 (self.owners, len(self.owners), ids))
        self.next_id = changes + 1
        # Socket s belongs to user s % users, as in the subscriber processes.
        claims_json = [json.dumps(self.claims[s % len(self.owners)]) for s in range(sockets)]
        set_role = sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(ROLE))
        check = sql.SQL("SELECT EXISTS(SELECT 1 FROM {} WHERE id = %s)").format(table)
        with psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench naive rls") as conn:
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            for row_id in ids[:2]:  # warm the plan and the caches
                with conn.transaction():
                    conn.execute(set_role)
                    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims_json[0],))
                    conn.execute(check, (row_id,))
            for _ in range(max(1, passes)):
                checks = visible = 0
                cpu0 = (time.process_time(), bc.cpu_seconds(backend))
                t0 = time.perf_counter()
                for row_id in ids:
                    for claims in claims_json:
                        with conn.transaction():
                            conn.execute(set_role)
                            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
                            if conn.execute(check, (row_id,)).fetchone()[0]:  # type: ignore[index]
                                visible += 1
                        checks += 1
                seconds = time.perf_counter() - t0
                result.passes.append(checks / seconds)
                if not result.seconds or seconds < result.seconds:
                    result.checks, result.visible, result.seconds = checks, visible, seconds
                    result.cpu_bench_pct = 100 * (time.process_time() - cpu0[0]) / seconds
                    result.cpu_backend_pct = 100 * (bc.cpu_seconds(backend) - cpu0[1]) / seconds
        expected_visible = sum(1 for row_id in ids for s in range(sockets) if s % len(self.owners) == row_id % len(self.owners))
        if result.visible != expected_visible:
            result.error = f"{result.visible:,} checks said visible, {expected_visible:,} expected"
        return result

    # --- processes --------------------------------------------------------

    def start_writer(self) -> None:
        log = open(self.log_dir / "writer.log", "ab")
        cfg = {"dsn": self.dsn, "payload_pad": self.args.payload_pad, "table": TABLE, "owners": self.owners}
        self.writer = pc.Proc(0, "writer", cfg, log, self.env)
        log.close()
        info = self.writer.read(30)
        if not info or not info.get("ready"):
            raise BenchError(f"writer did not start: {info}")
        self.writer_backend = int(info["backend_pid"])

    def start_rls_workers(self, n: int) -> int:
        """Open ``n`` sockets over the workers; socket i uses user i % users's token."""
        k = max(1, min(self.args.workers, n))
        log = open(self.log_dir / "subs.log", "ab")
        users = len(self.owners)
        for i in range(k):
            sockets = range(i, n, k)
            cfg = {"host": pc.HOST, "port": self.server_port, "path": self.path, "batch": self.args.join_batch,
                   "timeout": 60, "heartbeat_s": 30, "count": len(sockets), "filter_ids": None, "table": TABLE,
                   "tokens": self.tokens, "owners": self.owners, "user_of": [s % users for s in sockets]}
            self.workers.append(pc.Proc(i, "sub", cfg, log, self.env))
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
        self.joined_by_owner = {}
        for w in self.workers:
            for owner, count in w.info.get("joined_by_owner", {}).items():
                self.joined_by_owner[owner] = self.joined_by_owner.get(owner, 0) + int(count)
        errors = [e for w in self.workers for e in w.info.get("errors", [])]
        if errors:
            print(f"  join errors: {errors[:3]}", flush=True)
        return sum(int(w.info.get("joined", 0)) for w in self.workers)

    def stop_replicator_stats(self) -> tuple[int, int, int] | None:
        """Stop the replicator; (changes, RLS queries, RLS runs) from its stop line."""
        self.stop_replicator()
        if self.replicator_log is None or not self.replicator_log.exists():
            return None
        match = None
        for match in STOP_LINE.finditer(self.replicator_log.read_text("utf-8", "replace")):
            pass
        return (int(match[1]), int(match[2]), int(match[3])) if match else None

    def replicator_problems(self) -> list[str]:
        lines = []
        for path in sorted(self.log_dir.glob("replicator-*.log")):
            with contextlib.suppress(OSError):
                lines += [line for line in path.read_text("utf-8", "replace").splitlines()
                          if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
        return lines

    # --- measurements -----------------------------------------------------

    def cpu_snapshot(self) -> dict[str, Any]:
        """The parent's groups, with the replicator's visibility-check backend (chkPG) taken out of pg."""
        snap = super().cpu_snapshot()
        checks = self.backend_pid(f"realtime replicate {self.slot} checks")
        groups = snap["groups"]
        groups["chkPG"] = {}
        if checks and checks in groups.get("pg", {}):
            groups["chkPG"][checks] = groups["pg"].pop(checks)
        return snap

    def expected_for(self, id_base: int, rows: int) -> int:
        users = len(self.owners)
        total = 0
        for residue, owner in enumerate(self.owners):
            first = id_base + (residue - id_base) % users
            count = 0 if first >= id_base + rows else (id_base + rows - 1 - first) // users + 1
            total += count * self.joined_by_owner.get(owner, 0)
        return total

    def leaked_total(self) -> int:
        return sum(int(w.rpc({"cmd": "status"})["counters"].get("leaked", 0)) for w in self.workers)

    def rls_step(self, rate: float, duration: float, drain_limit: float) -> Step:
        assert self.writer is not None and self.server is not None
        label = f"{rate:g}" if rate else "max"
        st = Step(label, rate)
        self.start_replicator()
        try:
            if not self.quiesce(20):
                st.note = "previous deliveries still arriving"
            leaked_before = self.leaked_total()
            self.step_id += 1
            step_id = self.step_id
            id_base = self.next_id
            s0 = self.cpu_snapshot()
            reply = self.writer.expect({"cmd": "run", "step": step_id, "rate": rate, "duration": duration,
                                        "rows": 0 if rate else self.args.max_rows, "id_base": id_base,
                                        "id_space": UNBOUNDED_IDS, "truncate_first": False,
                                        "tick_ms": self.args.tick_ms, "max_batch": self.args.max_batch},
                                       duration + 120)
            st.rows = int(reply["sent"])
            self.next_id += st.rows
            st.write_rate = float(reply["rate"])
            st.rows_per_commit = float(reply["rows_per_commit"])
            marker_lsn = self.marker()
            written = time.monotonic()
            st.expected = self.expected_for(id_base, st.rows)
            caught_up_at = self.wait_delivered(step_id, st.expected, marker_lsn, written, drain_limit)
            s1 = self.cpu_snapshot()
            st.cpu = self.cpu_delta(s0, s1)
            self.gather_latency(st, step_id, reply)
            st.caught_up = caught_up_at is not None
            if caught_up_at is not None:
                st.lag_s = max(0.0, caught_up_at - written)
            st.leaked = self.leaked_total() - leaked_before
        finally:
            stats = self.stop_replicator_stats()
        if stats is not None:
            st.repl_changes, st.rls_queries, st.rls_runs = stats
        if not st.caught_up:
            st.note = (st.note + "; " if st.note else "") + "replicator behind at the end of the step"
            self.wait_slot_inactive()
            self.sql("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (self.slot,))
        return st

    def run_steps(self) -> list[Step]:
        steps: list[Step] = []
        self.start_server()
        try:
            started = time.monotonic()
            joined = self.start_rls_workers(self.args.sockets)
            per_user = ", ".join(str(self.joined_by_owner.get(o, 0)) for o in self.owners)
            print(f"\n== {joined}/{self.args.sockets} sockets subscribed in {time.monotonic() - started:.1f}s "
                  f"({len(self.owners)} users, sockets per user: {per_user})", flush=True)
            if joined == 0:
                raise BenchError("no subscriber joined")
            print("  " + STEP_HEADER, flush=True)
            for rate in self.args.rates:
                if time.monotonic() > self.args.deadline - 45:
                    print("  (time budget nearly spent: skipping the remaining steps)", flush=True)
                    break
                is_max = rate == 0
                st = self.rls_step(rate, self.args.max_duration if is_max else self.args.duration,
                                   self.args.drain_limit_max if is_max else self.args.drain_limit)
                steps.append(st)
                print("  " + step_row(st), flush=True)
        except BaseException:
            # The caller prints the figures measured so far.
            self.steps_done = steps
            raise
        finally:
            self.stop_workers()
            self.stop_server()
        return steps

    def cleanup(self) -> None:
        self.table_created = False  # the parent's table (bench_rows) is not ours
        super().cleanup()
        if not (self.rls_table_created or self.publication_created):
            return
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench cleanup") as conn:
                if self.publication_created:
                    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.args.publication)))
                if self.rls_table_created and not self.args.keep_table:
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", TABLE)))
        except Exception as error:
            print(f"  could not drop the publication or table: {error}", flush=True)


def _jwt_payload(token: str) -> str:
    body = token.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def _owner_gone(name: str) -> bool:
    pid = name[len(PREFIX):].split("_", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()


# --- output ---------------------------------------------------------------------------------

CPU_KEYS = ("server", "repl", "replPG", "chkPG", "pg", "redis", "subs", "writer", "others", "machine")
STEP_HEADER = (f"{'rate':>5} {'rows':>7} {'write/s':>8} {'r/txn':>5} {'expected':>9} {'received':>9} {'loss':>7} "
               f"{'leaks':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'dlv/s':>8} {'lag s':>5} "
               f"{'Q':>6} {'R':>6} {'Q/R':>5} {'Q/chg':>6} {'chg/R':>6}  CPU% " + " ".join(f"{k:>6}" for k in CPU_KEYS))


def step_row(s: Step) -> str:
    cpu = " ".join(f"{s.cpu.get(k, 0):>6.0f}" for k in CPU_KEYS)
    return (f"{s.label:>5} {s.rows:>7,} {s.write_rate:>8,.0f} {s.rows_per_commit:>5.0f} {s.expected:>9,} "
            f"{s.received:>9,} {s.loss:>7,} {s.leaked:>5,} {pc.fmt(s.p50_ms, '.1f'):>7} {pc.fmt(s.p99_ms, '.1f'):>7} "
            f"{s.max_ms:>8.1f} {s.deliveries_per_s:>8,.0f} {pc.fmt(s.lag_s, '.1f'):>5} "
            f"{pc.fmt(s.rls_queries, ',d'):>6} {pc.fmt(s.rls_runs, ',d'):>6} {pc.fmt(s.queries_per_batch, '.1f'):>5} "
            f"{pc.fmt(s.queries_per_change, '.2f'):>6} {pc.fmt(s.changes_per_batch, '.1f'):>6}       {cpu}"
            + (f"  ({s.note})" if s.note else ""))


def print_legend() -> None:
    print("columns: rate = target changes/s (max = as fast as the writer can), rows = rows inserted, write/s = the "
          "writer's achieved rate, r/txn = rows per transaction, expected/received/loss = authorized deliveries, leaks "
          "= changes received by a socket whose user does not own the row, p50/p99/max = commit-to-client latency, "
          "dlv/s = deliveries per second from first commit to last receipt, lag s = seconds after the writer stopped "
          "until the slot passed its last row; from the replicator's stop line: Q = row level security queries, R = "
          "runs (change batches) checked, Q/R = queries per batch, Q/chg = queries per change, chg/R = changes per "
          "batch (N counts one marker row per step); CPU% of one core: server, repl = replicator, replPG = its slot "
          "backend, chkPG = its visibility-check backend, pg = other PostgreSQL processes, redis, subs = subscriber "
          "processes, writer (with its backend), others = every other user process; machine = busy time of all CPUs "
          "(% of all cores)", flush=True)


def print_summary(args: argparse.Namespace, naive: Naive | None, steps: list[Step]) -> None:
    print("\n" + "=" * 120)
    print(f"Summary: {args.sockets:,} sockets over {args.users} users ({args.sockets // max(1, args.users)} per user, "
          f"one token per user), RLS policy user_id = auth.uid() on public.{TABLE}")
    if naive is not None and naive.checks:
        print(f"\n  naive (one query per socket and change, one connection): {naive.checks:,} checks "
              f"({naive.changes} changes x {naive.sockets:,} sockets) in {naive.seconds:.2f}s = "
              f"{naive.checks_per_s:,.0f} checks/s (fastest pass; checks/s of each: "
              f"{', '.join(f'{r:,.0f}' for r in naive.passes)}); {naive.visible:,} visible; bench process CPU "
              f"{naive.cpu_bench_pct:.0f}%, its backend {naive.cpu_backend_pct:.0f}%"
              + (f"  ERROR: {naive.error}" if naive.error else ""))
        print(f"    ceiling of authorized deliveries/s = checks/s x {naive.visible / naive.checks:.2f} visible = "
              f"{naive.ceiling:,.0f}/s; RLS queries per change batch = sockets = {naive.sockets:,}")
    if steps:
        print(f"\n  {'rate':>6} {'rows':>7} {'expected':>9} {'delivered':>9} {'loss':>7} {'leaks':>5} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'deliveries/s':>12} {'Q/batch':>7} {'Q/change':>8} {'chg/batch':>9} {'srv CPU':>7} "
              f"{'repl CPU':>8} {'checkPG':>7}")
        for s in steps:
            print(f"  {s.label:>6} {s.rows:>7,} {s.expected:>9,} {s.received:>9,} {s.loss:>7,} {s.leaked:>5,} "
                  f"{pc.fmt(s.p50_ms, '.1f'):>7} {pc.fmt(s.p99_ms, '.1f'):>7} {s.deliveries_per_s:>12,.0f} "
                  f"{pc.fmt(s.queries_per_batch, '.1f'):>7} {pc.fmt(s.queries_per_change, '.2f'):>8} "
                  f"{pc.fmt(s.changes_per_batch, '.1f'):>9} {s.cpu.get('server', 0):>6.0f}% {s.cpu.get('repl', 0):>7.0f}% "
                  f"{s.cpu.get('chkPG', 0):>6.0f}%")
    top = next((s for s in steps if s.rate == 0), None) or max(steps, key=lambda s: s.deliveries_per_s, default=None)
    if naive is not None and naive.ceiling and top is not None:
        print(f"\n  ours at the {top.label} step: {top.deliveries_per_s:,.0f} authorized deliveries/s vs the naive "
              f"ceiling {naive.ceiling:,.0f}/s -> {top.deliveries_per_s / naive.ceiling:.1f}x")
    worst = max((s.queries_per_batch for s in steps if s.queries_per_batch is not None), default=None)
    if naive is not None and naive.sockets:
        print(f"  RLS queries per change batch: naive {naive.sockets:,}, ours {pc.fmt(worst, '.1f')} (worst step)")

    print("\n  Targets:")
    measured = [s for s in steps if s.rls_runs]
    ok = bool(measured) and worst is not None and worst <= QUERIES_PER_BATCH_TARGET
    print(f"    <= {QUERIES_PER_BATCH_TARGET:g} RLS queries per change batch ({args.sockets:,} sockets): "
          f"worst {pc.fmt(worst, '.1f')} -> {'PASS' if ok else 'FAIL'}")
    good = [s for s in steps if s.meets_latency and s.rate]  # the max step is a burst, not a sustained rate
    best = max(good, key=lambda s: s.deliveries_per_s, default=None)
    if best is None:
        print(f"    >= {DELIVERIES_TARGET:,.0f} authorized deliveries/s with p99 <= {P99_TARGET_MS:g} ms: no fixed-rate step met "
              f"p99 <= {P99_TARGET_MS:g} ms without loss -> FAIL")
    else:
        ok = best.deliveries_per_s >= DELIVERIES_TARGET
        print(f"    >= {DELIVERIES_TARGET:,.0f} authorized deliveries/s with p99 <= {P99_TARGET_MS:g} ms: highest such "
              f"fixed-rate step {best.label} changes/s: {best.deliveries_per_s:,.0f} deliveries/s, p99 {pc.fmt(best.p99_ms, '.1f')} ms "
              f"-> {'PASS' if ok else 'FAIL'}")
    leaks = sum(s.leaked for s in steps)
    print(f"    no delivery to a socket whose user does not own the row: {leaks:,} leaks -> "
          f"{'PASS' if steps and leaks == 0 else 'FAIL'}")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="row level security postgres_changes benchmark (see module docstring).")
    p.add_argument("--quick", action="store_true", help="small run, about a minute")
    p.add_argument("--sockets", type=int, help="subscribed sockets (default 1000; quick: 200)")
    p.add_argument("--users", type=int, default=10, help="distinct users (claim sets) the sockets are spread over")
    p.add_argument("--rates", type=float, nargs="+", help="target changes/s per step, 0 = max (default 10 40 100 200 0)")
    p.add_argument("--duration", type=float, help="seconds per fixed-rate step (default 10; quick: 2)")
    p.add_argument("--max-duration", type=float, help="seconds of writing in the max step (default 5; quick: 2)")
    p.add_argument("--max-rows", type=int, help="stop the max step after this many rows (default 1500; quick: 300)")
    p.add_argument("--drain-limit", type=float, help="max seconds to wait for a fixed-rate step's deliveries "
                   "(default 30; quick: 10)")
    p.add_argument("--drain-limit-max", type=float, help="the same for the max step (default 90; quick: 20)")
    p.add_argument("--naive-changes", type=int, help="changes checked by the naive baseline (default 20; quick: 5)")
    p.add_argument("--naive-passes", type=int, help="passes of the naive baseline, the fastest counts "
                   "(default 3; quick: 1)")
    p.add_argument("--max-batch", type=int, default=500, help="max rows per insert statement")
    p.add_argument("--tick-ms", type=float, default=5.0, help="writer batching interval at fixed rates (ms)")
    p.add_argument("--payload-pad", type=int, default=16, help="bytes of padding in each row's payload")
    p.add_argument("--workers", type=int, default=2, help="subscriber processes (default 2)")
    p.add_argument("--join-batch", type=int, default=20, help="joins in flight per subscriber process")
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 900; quick: 240)")
    p.add_argument("--keep-table", action="store_true", help=f"leave {TABLE} in place at the end")
    p.add_argument("--log-dir", type=Path, help="server, replicator and load-generator logs (default: a temp dir)")
    args = p.parse_args(argv)
    q = args.quick
    args.sockets = args.sockets or (200 if q else 1000)
    if args.users < 1 or args.sockets < args.users:
        p.error("need at least one user and one socket per user")
    args.rates = sorted(args.rates if args.rates is not None else [10, 40, 100, 200, 0], key=lambda r: (r == 0, r))
    args.duration = args.duration or (2.0 if q else 10.0)
    args.max_duration = args.max_duration or (2.0 if q else 5.0)
    args.max_rows = args.max_rows or (300 if q else 1500)
    args.drain_limit = args.drain_limit or (10.0 if q else 30.0)
    args.drain_limit_max = args.drain_limit_max or (20.0 if q else 90.0)
    args.naive_changes = args.naive_changes or (5 if q else 20)
    args.naive_passes = args.naive_passes or (1 if q else 3)
    args.timeout = args.timeout or (240.0 if q else 900.0)
    args.publication = ""  # set per run by Bench
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, _, log_dir = bc.begin_run(args, "rls", 10)
    steps: list[Step] = []
    naive: Naive | None = None
    bench: Bench | None = None
    code = 0
    try:
        env = bc.service_env()
        bench = Bench(args, env, log_dir)
        print(f"rls bench: {args.sockets:,} sockets over {args.users} users; rates="
              f"{' '.join('max' if r == 0 else f'{r:g}' for r in args.rates)} step={args.duration:g}s max step="
              f"{args.max_duration:g}s or {args.max_rows:,} rows; naive over {args.naive_changes} changes", flush=True)
        print(f"server code: {bc.describe_tree(REPO)}; cpus={os.cpu_count()}; slot {bench.slot}; publication "
              f"{args.publication}; layer prefix {bench.prefix}; logs in {log_dir}", flush=True)
        bench.drop_stale()
        bench.setup_table()
        print(f"\n== naive baseline: {args.naive_changes} changes x {args.sockets:,} sockets, one query each, "
              f"{args.naive_passes} pass(es) ...", flush=True)
        naive = bench.naive(args.naive_changes, args.sockets, args.naive_passes)
        print(f"  fastest pass: {naive.checks:,} checks in {naive.seconds:.2f}s = {naive.checks_per_s:,.0f} checks/s "
              f"({naive.visible:,} visible) -> ceiling {naive.ceiling:,.0f} authorized deliveries/s"
              + (f"  ERROR: {naive.error}" if naive.error else ""), flush=True)
        bench.create_slot(bench.slot)
        bench.start_writer()
        print_legend()
        steps = bench.run_steps()
    except (KeyboardInterrupt, TimeoutError, SystemExit) as reason:
        code = 130
        print(f"\ninterrupted: {reason!r}", flush=True)
    except Exception as error:
        code = 1
        print(f"ERROR: {type(error).__name__}: {error}", flush=True)
        if not isinstance(error, (bc.BenchError, OSError, lg.HandshakeError)):
            traceback.print_exc()
    finally:
        signal.alarm(0)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if bench is not None:
                steps = steps or bench.steps_done
                bench.cleanup()
                problems = bench.replicator_problems()
                if problems:
                    print(f"  replicator logged {len(problems)} warning(s)/error(s), e.g. {problems[0][:200]}",
                          flush=True)
            else:
                bc.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)
    print_summary(args, naive, steps)
    print(f"\ntotal {time.monotonic() - started:.0f}s; logs in {log_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
