"""Row level security benchmark: authorized postgres_changes deliveries to many sockets of many users.

The script recreates ``public.bench_rls (id bigint primary key, user_id uuid, payload text, sent_ns
bigint)`` with row level security enabled and one policy, ``owner``: ``authenticated`` may SELECT a
row only if ``user_id = auth.uid()``. The table goes into a publication of this run's own, read by
one replicator (``manage.py replicate --no-broadcasts`` on a slot of its own) and one daphne server
(``manage.py runserver``), both wrapped by ``bench/_pgcount.py`` so their PostgreSQL statements and
round trips are counted; slot, publication, table and the baseline's schema are dropped at the end,
whatever happens (``bench/_pgbench.py``).

Subscribers: ``--sockets`` sockets held by load-generator processes (``bench/_pgload.py sub``),
spread evenly over ``--users`` users (socket s belongs to user s % users). User i's uuid is derived
from the run's seed (``md5(seed:i)``, so the writer computes it in SQL); each worker mints the
users' ``authenticated`` tokens itself from ``JWT_SECRET`` with the same ``sub``, ``iat`` and
``exp``, so every socket of a user sends the very same token and the server sees ``--users``
distinct claim sets. Nothing large goes on a command line: worker configs are files. Rows are
written by another process (``bench/_pgload.py writer``); row ``id`` belongs to user ``id % users``,
so each change is authorized for sockets/users sockets and must reach no other: a change a socket
receives whose ``user_id`` is not its user's is counted as a leak.

Steps: the writer inserts at rising rates, a fixed time per step, then as fast as it can up to
``--max-rows``. The replicator is restarted around every step, so its stop line ("stopped after N
changes; Q row level security queries for R runs") gives that step's visibility queries (Q) and
change batches that needed a check (R). The server's own checks (``realtime.hub``'s ``row_check``,
for claim sets the replicator had not seen and for filtered ones, which it leaves to the server) are
counted too: statements and round trips of the server process
during the step, and of the replicator's connections other than its slot reader. Printed per batch:
Q/R, hub statements/R, round trips/R. Each step also reports authorized deliveries/s, latency
(client receipt minus ``sent_ns``), delivered vs expected, duplicates, leaks, and CPU. A step passes
only with no loss, no duplicates, no leak, the writer within 1% of its target rate and p99 within
``--p99-ms``.

Baselines, measured first against the same PostgreSQL from this process, over ``--baseline-changes``
rows and every socket (a subscription per socket, as the reference has one per subscriber):

- ``naive``: one transaction per socket and change from the client, about five round trips each
  (BEGIN, ``SET LOCAL ROLE``, ``set_config('request.jwt.claims', ...)``, ``SELECT EXISTS (...)``,
  COMMIT);
- ``reference``: the way Supabase's server runs it: one SQL call per change into a plpgsql function
  that loops over the subscriptions inside PostgreSQL, per subscription setting ``role`` and
  ``request.jwt.claims`` locally and running one prepared statement (prepared once per change) that
  checks the row's visibility; no client round trip per subscription. (The reference also batches
  the changes of one poll into one query; with one call per change the difference is one round trip
  per change, small beside the loop.)

The fastest of ``--baseline-passes`` passes counts, each capped at ``--baseline-seconds``. Each check
can yield at most one delivery, so a baseline's ceiling of authorized deliveries/s is its checks/s
times the visible fraction (1 / users). The headline ratio compares the best fixed-rate step that
passed (no loss, p99 within bound; never the max step, a burst) with each ceiling.

Presets for issue #11 (``--preset``): ``users10`` (1,000 sockets of 10 users, the default),
``users1k`` (1,000 sockets of 1,000 users at 100 changes/s and up), ``users5k`` (5,000 sockets of
5,000 users), ``users10k`` (10,000 sockets of 10,000 users). ``users1k-own`` and ``users5k-own`` are
``users1k`` and ``users5k`` with ``--filter-owner``: each socket subscribes with the filter
``user_id=eq.<its user's uuid>``, as an app that shows a user their own rows does; what a socket may
receive is the same (its user's rows), but only the claim sets a row is routed to are checked. Explicit ``--sockets``, ``--users``,
``--rates``, ``--p99-ms`` override a preset.

Usage::

    .venv/bin/python bench/rls.py --quick
    .venv/bin/python bench/rls.py --users 200 --sockets 200 --quick
    .venv/bin/python bench/rls.py --preset users1k
    .venv/bin/python bench/rls.py --sockets 2000 --users 20 --rates 40 100 200 0 --duration 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))

import _pgbench as pb  # noqa: E402
import _pgload as pl  # noqa: E402

TABLE = "bench_rls"
ROLE = "authenticated"
QUERIES_PER_BATCH_TARGET = 10.0
DELIVERIES_TARGET = 4000.0
PRESETS: dict[str, dict[str, Any]] = {
    "users10": {"sockets": 1000, "users": 10, "rates": [10, 40, 100, 200, 0], "p99_ms": 150.0},
    "users1k": {"sockets": 1000, "users": 1000, "rates": [100, 250, 500, 1000, 0], "p99_ms": 100.0},
    "users5k": {"sockets": 5000, "users": 5000, "rates": [100, 250, 0], "p99_ms": 250.0},
    "users10k": {"sockets": 10000, "users": 10000, "rates": [100, 0], "p99_ms": 250.0},
    "users1k-own": {"sockets": 1000, "users": 1000, "rates": [100, 250, 500, 1000, 0], "p99_ms": 100.0,
                    "filter_owner": True},
    "users5k-own": {"sockets": 5000, "users": 5000, "rates": [100, 250, 0], "p99_ms": 250.0, "filter_owner": True},
}
fmt = pb.fmt


# --- results ---------------------------------------------------------------------------


@dataclass
class Baseline:
    kind: str  # naive | reference
    changes: int = 0
    sockets: int = 0
    checks: int = 0
    visible: int = 0
    seconds: float = 0.0  # the fastest pass
    passes: list[float] = field(default_factory=list)  # checks/s of every pass
    statements_per_change: float = 0.0  # statements the client sends per change
    round_trips_per_change: float = 0.0
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

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "checks_per_s": self.checks_per_s, "ceiling": self.ceiling}


@dataclass
class Step(pb.Delivery):
    leaked: int = 0
    repl_changes: int | None = None
    rls_queries: int | None = None  # the replicator's own count (its stop line)
    rls_runs: int | None = None
    repl_statements: int | None = None  # the replicator's statements and round trips, slot reading left out
    repl_round_trips: int | None = None
    hub_statements: int | None = None  # the server's, during the step (fallback checks and any other)
    hub_round_trips: int | None = None
    hub_checks: int | None = None  # of which run as a subscriber: the fallback visibility checks

    @property
    def queries_per_batch(self) -> float | None:
        return self.rls_queries / self.rls_runs if self.rls_queries is not None and self.rls_runs else None

    @property
    def hub_per_batch(self) -> float | None:
        return self.hub_checks / self.rls_runs if self.hub_checks is not None and self.rls_runs else None

    @property
    def round_trips_per_batch(self) -> float | None:
        if self.repl_round_trips is None or self.hub_round_trips is None or not self.rls_runs:
            return None
        return (self.repl_round_trips + self.hub_round_trips) / self.rls_runs

    @property
    def changes_per_batch(self) -> float | None:
        return self.repl_changes / self.rls_runs if self.repl_changes is not None and self.rls_runs else None

    def failures(self, bound_ms: float | None = None) -> list[str]:
        out = super().failures(bound_ms)
        if self.leaked:
            out.append(f"{self.leaked:,} leaks")
        return out

    def record(self) -> dict[str, Any]:
        return {**super().record(), "queries_per_batch": self.queries_per_batch, "hub_per_batch": self.hub_per_batch,
                "round_trips_per_batch": self.round_trips_per_batch, "changes_per_batch": self.changes_per_batch}


# --- the bench -----------------------------------------------------------------------------


class Bench(pb.Bench):
    """The RLS table, per-user tokens minted by the workers, per-step replicator and server counts."""

    slot_prefix = "bench_rls_"
    layer_prefix = "rtbenchrls"

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(args, env, log_dir)
        now = int(time.time())
        self.users = {"seed": self.tag, "count": args.users, "role": ROLE, "iat": now, "exp": now + 24 * 3600}
        self.joined_by_owner: dict[str, int] = {}
        self.schema = ""  # the reference baseline's schema
        self.baselines: list[Baseline] = []
        self.steps: list[Step] = []
        self.joined = 0

    def owner(self, user: int) -> str:
        return pl.owner_uuid(self.tag, user)

    def claims_json(self, user: int) -> str:
        return json.dumps(pl.user_claims(self.users, user))

    def writer_config(self) -> dict[str, Any]:
        return {**super().writer_config(), "table": TABLE, "users": self.users}

    # --- database ---------------------------------------------------------

    def drop_stale(self) -> None:
        """The parent's slots and publications, and the baseline schemas of earlier runs whose process is gone."""
        from psycopg import sql

        super().drop_stale()
        for (name,) in self.sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (self.slot_prefix + "%",)):
            if self._owner_gone(name):
                self.sql(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
                print(f"  dropped stale schema {name} of a previous run", flush=True)

    def setup_table(self) -> None:
        from psycopg import sql

        from realtime.dbsetup import SETUP_SQL

        self.sql(SETUP_SQL)
        table = sql.Identifier("public", TABLE)
        self.create_table(TABLE, "id bigint PRIMARY KEY, user_id uuid, payload text, sent_ns bigint")
        self.sql(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        self.sql(sql.SQL("CREATE POLICY owner ON {} FOR SELECT TO {} USING (user_id = auth.uid())")
                 .format(table, sql.Identifier(ROLE)))
        self.sql(sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(ROLE)))
        self.create_publication(self.args.publication, TABLE)

    def baseline_rows(self, changes: int) -> list[int]:
        """Insert the rows the baselines check (before the slot exists: the replicator never sees them)."""
        from psycopg import sql

        ids = list(range(self.next_id, self.next_id + changes))
        self.sql(sql.SQL("INSERT INTO {} (id, user_id, payload, sent_ns) SELECT g, md5({} || ':' || mod(g, {})::text)::uuid, "
                         "'baseline', 0 FROM unnest(%s::bigint[]) g").format(
                             sql.Identifier("public", TABLE), sql.Literal(self.tag), sql.Literal(self.args.users)), (ids,))
        self.next_id += changes
        return ids

    def naive(self, ids: list[int], sockets: int, passes: int, cap_s: float) -> Baseline:
        """One client transaction per socket and change, about five round trips each, on one connection."""
        import psycopg
        from psycopg import sql

        result = Baseline("naive", sockets=sockets, statements_per_change=5 * sockets, round_trips_per_change=5 * sockets)
        users = self.args.users
        claims = [self.claims_json(s % users) for s in range(sockets)]
        set_role = sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(ROLE))
        check = sql.SQL("SELECT EXISTS(SELECT 1 FROM {} WHERE id = %s)").format(sql.Identifier("public", TABLE))
        with psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench naive rls") as conn:
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            for row_id in ids[:2]:  # warm the plan and the caches
                with conn.transaction():
                    conn.execute(set_role)
                    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims[0],))
                    conn.execute(check, (row_id,))

            def one_pass() -> tuple[int, int, int]:
                checks = visible = done = 0
                end = time.perf_counter() + cap_s
                for row_id in ids:
                    for claim in claims:
                        with conn.transaction():
                            conn.execute(set_role)
                            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claim,))
                            if conn.execute(check, (row_id,)).fetchone()[0]:  # type: ignore[index]
                                visible += 1
                        checks += 1
                    done += 1
                    if time.perf_counter() > end:
                        break
                return checks, visible, done

            self._passes(result, one_pass, passes, backend)
        return result

    def create_reference(self) -> None:
        """The reference's check, server side: a subscription table and a plpgsql loop over it."""
        from psycopg import sql

        self.schema = self.slot
        schema = sql.Identifier(self.schema)
        self.sql(sql.SQL("CREATE SCHEMA {}").format(schema))
        self.sql(sql.SQL("CREATE TABLE {}.subscription (id int PRIMARY KEY, claims jsonb NOT NULL, "
                         "claims_role text NOT NULL)").format(schema))
        users = self.args.users
        rows = [(s, self.claims_json(s % users), ROLE) for s in range(self.args.sockets)]
        with self.pg.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {}.subscription VALUES (%s, %s::jsonb, %s)").format(schema), rows)
        # Per change: prepare the visibility statement for this row once, then per subscription set the
        # role and the claims locally and execute it; the loop runs inside PostgreSQL.
        self.sql(sql.SQL("""
CREATE FUNCTION {schema}.apply_rls(row_id bigint) RETURNS int[] LANGUAGE plpgsql AS $fn$
DECLARE
    subs {schema}.subscription[];
    sub {schema}.subscription;
    visible int[] := '{{}}';
    has_access boolean;
BEGIN
    SELECT coalesce(array_agg(s ORDER BY s.id), '{{}}') INTO subs FROM {schema}.subscription s;
    IF EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = 'bench_rls_stmt') THEN
        DEALLOCATE bench_rls_stmt;
    END IF;
    EXECUTE format('PREPARE bench_rls_stmt AS SELECT EXISTS (SELECT 1 FROM {table} WHERE id = %L)', row_id);
    FOREACH sub IN ARRAY subs LOOP
        PERFORM set_config('role', sub.claims_role, true),
                set_config('request.jwt.claims', sub.claims::text, true);
        EXECUTE 'EXECUTE bench_rls_stmt' INTO has_access;
        IF has_access THEN
            visible := visible || sub.id;
        END IF;
    END LOOP;
    PERFORM set_config('role', NULL, true);
    RETURN visible;
END
$fn$""").format(schema=schema, table=sql.Identifier("public", TABLE)))

    def reference(self, ids: list[int], passes: int, cap_s: float) -> Baseline:
        """One call per change into the server-side loop over every subscription."""
        import psycopg
        from psycopg import sql

        sockets = self.args.sockets
        result = Baseline("reference", sockets=sockets, statements_per_change=1, round_trips_per_change=1)
        call = sql.SQL("SELECT {}.apply_rls(%s)").format(sql.Identifier(self.schema))
        users = self.args.users
        with psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench reference rls") as conn:
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            conn.execute(call, (ids[0],))  # warm the caches

            def one_pass() -> tuple[int, int, int]:
                checks = visible = done = 0
                wrong = 0
                end = time.perf_counter() + cap_s
                for row_id in ids:
                    subs = conn.execute(call, (row_id,)).fetchone()[0]  # type: ignore[index]
                    checks += sockets
                    visible += len(subs)
                    wrong += sum(1 for s in subs if s % users != row_id % users)
                    done += 1
                    if time.perf_counter() > end:
                        break
                if wrong:
                    result.error = f"{wrong:,} subscriptions saw a row they do not own"
                return checks, visible, done

            self._passes(result, one_pass, passes, backend)
        return result

    def _passes(self, result: Baseline, one_pass: Any, passes: int, backend: int) -> None:
        """Run ``one_pass`` ``passes`` times; the fastest counts (the baseline gets the benefit of any noise)."""
        users = self.args.users
        for _ in range(max(1, passes)):
            cpu0 = (time.process_time(), pb.bc.cpu_seconds(backend))
            t0 = time.perf_counter()
            checks, visible, done = one_pass()
            seconds = time.perf_counter() - t0
            result.passes.append(checks / seconds)
            if not result.seconds or checks / seconds > result.checks_per_s:
                result.checks, result.visible, result.seconds, result.changes = checks, visible, seconds, done
                result.cpu_bench_pct = 100 * (time.process_time() - cpu0[0]) / seconds
                result.cpu_backend_pct = 100 * (pb.bc.cpu_seconds(backend) - cpu0[1]) / seconds
        # Row id i belongs to user i % users; socket s to user s % users.
        ids = range(self.next_id - self.args.baseline_changes, self.next_id - self.args.baseline_changes + result.changes)
        expected = sum(sockets_of(i % users, result.sockets, users) for i in ids)
        if result.visible != expected and not result.error:
            result.error = f"{result.visible:,} checks said visible, {expected:,} expected"

    # --- processes --------------------------------------------------------

    def start_rls_workers(self, n: int) -> int:
        """Open ``n`` sockets over the workers; socket i belongs to user i % users (tokens minted by the workers)."""
        k = max(1, min(self.args.workers, n))
        users = self.args.users
        configs = [{"count": len(range(i, n, k)), "filter_ids": None, "table": TABLE, "users": self.users,
                    "user_of": [s % users for s in range(i, n, k)], "filter_owner": self.args.filter_owner}
                   for i in range(k)]
        joined = self.start_workers(configs, "subs.log")
        self.joined_by_owner = {}
        for w in self.workers:
            for owner, count in w.info.get("joined_by_owner", {}).items():
                self.joined_by_owner[owner] = self.joined_by_owner.get(owner, 0) + int(count)
        return joined

    def cpu_groups(self) -> dict[str, list[int]]:
        """The parent's groups, with the replicator's visibility-check backend (chkPG) taken out of pg."""
        groups = super().cpu_groups()
        names = [f"realtime replicate {self.slot} checks"] + [f"realtime replicate {self.slot} checks {i}" for i in (2, 3, 4)]
        checks = [pid for pid in (self.backend_pid(name) for name in names) if pid and pid in groups["pg"]]
        groups["chkPG"] = checks
        groups["pg"] = [p for p in groups["pg"] if p not in checks]
        return groups

    # --- measurements -----------------------------------------------------

    def expected_for(self, id_base: int, rows: int) -> int:
        users = self.args.users
        total = 0
        for residue in range(users):
            joined = self.joined_by_owner.get(self.owner(residue), 0)
            if joined:
                total += pb.residue_count(id_base, rows, users, residue) * joined
        return total

    def rls_step(self, rate: float, duration: float, drain_limit: float) -> Step:
        assert self.writer is not None and self.server is not None
        label = f"{rate:g}" if rate else "max"
        st = Step(label, rate, duration=duration if rate else 0.0, p99_bound_ms=self.args.p99_ms)
        self.start_replicator()
        try:
            if not self.quiesce(20):
                st.note = "previous deliveries still arriving"
            st.receivers = sum(int(w.rpc({"cmd": "status"})["open"]) for w in self.workers)
            leaked_before = self.worker_counters().get("leaked", 0)
            self.step_id += 1
            step_id, id_base = self.step_id, self.next_id
            counts0 = self.db_counts()["server"]
            s0 = self.cpu_snapshot()
            reply = self.write(st, step_id, id_base, rows=0 if rate else self.args.max_rows)
            marker_lsn = self.marker()
            written = time.monotonic()
            st.expected = self.expected_for(id_base, st.rows)
            caught_up_at = self.wait_delivered(step_id, st.expected, marker_lsn, written, drain_limit, st)
            s1 = self.cpu_snapshot()
            st.cpu = self.cpu_delta(s0, s1)
            self.gather(st, step_id, reply)
            st.caught_up = caught_up_at is not None
            if caught_up_at is not None:
                st.lag_s = max(0.0, caught_up_at - written)
            st.leaked = self.worker_counters().get("leaked", 0) - leaked_before
            time.sleep(0.25)  # the counts files are rewritten every 0.1 s
            counts1 = self.db_counts()["server"]
            st.hub_statements = sum(v["statements"] for v in counts1.values()) - sum(v["statements"] for v in counts0.values())
            st.hub_round_trips = sum(v["round_trips"] for v in counts1.values()) - sum(v["round_trips"] for v in counts0.values())
            st.hub_checks = sum(v.get("as_subscriber", 0) for v in counts1.values()) - \
                sum(v.get("as_subscriber", 0) for v in counts0.values())
        finally:
            self.stop_replicator()
        stats = self.replicator_stats()
        if stats is not None:
            st.repl_changes, st.rls_queries, st.rls_runs = stats
        # Every connection of the replicator but its slot reader (which reads WAL, not rows).
        repl = {k: v for k, v in self.db_counts()["replicator"].items() if k != f"realtime replicate {self.slot}"}
        st.repl_statements = sum(v["statements"] for v in repl.values())
        st.repl_round_trips = sum(v["round_trips"] for v in repl.values())
        if not st.caught_up:
            st.note = (st.note + "; " if st.note else "") + "replicator behind at the end of the step"
            self.advance_slot()
        return st

    def run_steps(self) -> None:
        with self.serving():
            started = time.monotonic()
            self.joined = self.start_rls_workers(self.args.sockets)
            per_user = sorted(self.joined_by_owner.values())
            spread = f"{per_user[0]}-{per_user[-1]}" if per_user else "-"
            print(f"\n== {self.joined}/{self.args.sockets} sockets subscribed in {time.monotonic() - started:.1f}s "
                  f"({len(self.joined_by_owner)} of {self.args.users} users joined, {spread} sockets per user)", flush=True)
            if self.joined == 0:
                raise pb.BenchError("no subscriber joined")
            print("  " + STEP_HEADER, flush=True)
            self.run_rates(self.rls_step, step_row, 45)

    def cleanup(self) -> None:
        super().cleanup()
        if self.schema:
            import psycopg
            from psycopg import sql

            try:
                with psycopg.connect(self.dsn, autocommit=True, application_name="realtime bench cleanup") as conn:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
            except Exception as error:
                print(f"  could not drop schema {self.schema}: {error}", flush=True)


def sockets_of(user: int, sockets: int, users: int) -> int:
    """Sockets of ``user`` when socket s belongs to user s % users."""
    return sockets // users + (1 if user < sockets % users else 0)


# --- output ---------------------------------------------------------------------------------

CPU_KEYS = ("server", "repl", "replPG", "chkPG", "pg", "redis", "subs", "writer", "others", "machine")
STEP_HEADER = (f"{'rate':>5} {'rows':>7} {'write/s':>8} {'r/txn':>5} {'expected':>9} {'received':>9} {'loss':>7} "
               f"{'dups':>5} {'leaks':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'dlv/s':>8} {'lag s':>5} "
               f"{'R':>6} {'Q/R':>6} {'hub/R':>6} {'RT/R':>6} {'chg/R':>6}  CPU% " + pb.cpu_header(CPU_KEYS))


def step_row(s: Step) -> str:
    cpu = pb.cpu_cells(s.cpu, CPU_KEYS)
    return (f"{s.label:>5} {s.rows:>7,} {s.write_rate:>8,.0f} {s.rows_per_commit:>5.0f} {s.expected:>9,} "
            f"{s.received:>9,} {s.loss:>7,} {s.duplicates:>5,} {s.leaked:>5,} {fmt(s.p50_ms, '.1f'):>7} "
            f"{fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>8.1f} {s.deliveries_per_s:>8,.0f} {fmt(s.lag_s, '.1f'):>5} "
            f"{fmt(s.rls_runs, ',d'):>6} {fmt(s.queries_per_batch, '.1f'):>6} {fmt(s.hub_per_batch, '.1f'):>6} "
            f"{fmt(s.round_trips_per_batch, '.1f'):>6} {fmt(s.changes_per_batch, '.1f'):>6}       {cpu}"
            + (f"  ({s.note})" if s.note else ""))


def print_legend() -> None:
    print("columns: rate = target changes/s (max = as fast as the writer can), rows = rows inserted, write/s = the "
          "writer's achieved rate (rows over the scheduled time, or over the time it took to start its last statement "
          "plus one interval if that was later), r/txn = rows per transaction, expected/received/loss = "
          "authorized deliveries, dups = duplicates, leaks = changes received by a socket whose user does not own the "
          "row, p50/p99/max = commit-to-client latency, dlv/s = deliveries per second from first commit to last receipt, "
          "lag s = seconds after the writer stopped until the slot passed its last row; R = change batches (runs) that "
          "needed a row level security check (the replicator's stop line), Q/R = the replicator's row level security "
          "queries per batch, hub/R = the server's own checks per batch (statements run as a subscriber: claim sets the "
          "replicator had not seen, and filtered ones, which the replicator leaves to the server), RT/R = PostgreSQL "
          "round trips per batch of both (the replicator's slot reader left out), chg/R = changes per batch (one "
          "marker row per step included); CPU% of one core: server, repl = replicator, replPG = its slot backend, "
          "chkPG = its visibility-check backends (all of them, in % of one core), pg = other PostgreSQL processes, redis, subs = subscriber processes, "
          "writer, others = every other user process; machine = busy time of all CPUs (% of all cores)", flush=True)


def summary_lines(args: argparse.Namespace, bench: Bench | None) -> tuple[list[str], dict[str, Any]]:
    steps = bench.steps if bench else []
    baselines = bench.baselines if bench else []
    out = ["", "=" * 120,
           f"Summary: {args.sockets:,} sockets over {args.users:,} users ({args.sockets / max(1, args.users):g} per "
           f"user, one token per user), RLS policy user_id = auth.uid() on public.{TABLE}; preset {args.preset or '-'}"
           + ("; each socket filters user_id=eq.<its user's uuid>" if args.filter_owner else "")]
    summary: dict[str, Any] = {"scenario": args.preset or "custom", "filter_owner": args.filter_owner,
                               "sockets": args.sockets, "users": args.users,
                               "joined": bench.joined if bench else 0, "p99_bound_ms": args.p99_ms}
    for b in baselines:
        what = ("one client transaction per socket and change (BEGIN, SET LOCAL ROLE, set_config, SELECT, COMMIT)"
                if b.kind == "naive" else "one call per change into a plpgsql loop over the subscriptions "
                "(set role + claims locally, execute a prepared statement)")
        out.append(f"\n  {b.kind} baseline, {what}: {b.checks:,} checks ({b.changes} changes x {b.sockets:,} "
                   f"subscriptions) in {b.seconds:.2f}s = {b.checks_per_s:,.0f} checks/s (fastest pass; each: "
                   f"{', '.join(f'{r:,.0f}' for r in b.passes)}); {b.visible:,} visible; client statements per change "
                   f"{b.statements_per_change:,.0f}, round trips per change {b.round_trips_per_change:,.0f}; bench CPU "
                   f"{b.cpu_bench_pct:.0f}%, its backend {b.cpu_backend_pct:.0f}%" + (f"  ERROR: {b.error}" if b.error else ""))
        out.append(f"    ceiling of authorized deliveries/s = checks/s x {b.visible / max(1, b.checks):.4f} visible = "
                   f"{b.ceiling:,.0f}/s")
        summary[f"{b.kind}_ceiling"] = b.ceiling
        summary[f"{b.kind}_checks_per_s"] = b.checks_per_s
    if steps:
        out.append(f"\n  {'rate':>6} {'rows':>7} {'write/s':>8} {'expected':>9} {'delivered':>9} {'loss':>7} {'dups':>5} "
                   f"{'leaks':>5} {'p50 ms':>7} {'p99 ms':>7} {'deliveries/s':>12} {'Q/batch':>7} {'hub/batch':>9} "
                   f"{'RT/batch':>8} {'chg/batch':>9} {'srv CPU':>7} {'repl CPU':>8} {'checkPG':>7}  verdict")
        for s in steps:
            out.append(f"  {s.label:>6} {s.rows:>7,} {s.write_rate:>8,.0f} {s.expected:>9,} {s.received - s.duplicates:>9,} "
                       f"{s.loss:>7,} {s.duplicates:>5,} {s.leaked:>5,} {fmt(s.p50_ms, '.1f'):>7} {fmt(s.p99_ms, '.1f'):>7} "
                       f"{s.deliveries_per_s:>12,.0f} {fmt(s.queries_per_batch, '.1f'):>7} {fmt(s.hub_per_batch, '.1f'):>9} "
                       f"{fmt(s.round_trips_per_batch, '.1f'):>8} {fmt(s.changes_per_batch, '.1f'):>9} "
                       f"{s.cpu.get('server', 0):>6.0f}% {s.cpu.get('repl', 0):>7.0f}% {s.cpu.get('chkPG', 0):>6.0f}%  "
                       f"{s.verdict()}")
        for s in steps:
            if s.rate == 0:
                got = s.received - s.duplicates
                out.append(f"  max step (a burst): {s.rows:,} rows written at {s.write_rate:,.0f}/s; {got:,} of "
                           f"{s.expected:,} authorized deliveries ({100 * got / max(1, s.expected):.1f}%) received "
                           + (f"between {fmt(s.first_s, '.2f')}s and {fmt(s.last_s, '.2f')}s after the first commit"
                              if got else "at all")
                           + "; replicator " + (f"caught up {fmt(s.lag_s, '.1f')}s after the writer stopped" if s.caught_up
                                                 else "had not caught up")
                           + f"; the bench stopped waiting {fmt(s.ended_s, '.1f')}s after the writes ({s.end_reason})")
    good = [s for s in steps if s.rate and s.ok]  # the max step is a burst, not a sustained rate
    best = max(good, key=lambda s: s.deliveries_per_s, default=None)
    if best is not None:
        out.append("")
        for b in baselines:
            if b.ceiling:
                out.append(f"  ours at the {best.label} changes/s step (the best fixed-rate step without loss and with "
                           f"p99 <= {args.p99_ms:g} ms): {best.deliveries_per_s:,.0f} authorized deliveries/s vs the "
                           f"{b.kind} ceiling {b.ceiling:,.0f}/s -> {best.deliveries_per_s / b.ceiling:.1f}x")
                summary[f"ratio_to_{b.kind}"] = best.deliveries_per_s / b.ceiling
        burst = next((s for s in steps if s.rate == 0), None)
        out.append("  (ours is what that step's target rate asked for, not our ceiling: higher fixed rates failed or were not run"
                   + (f"; the max step, a burst, delivered {burst.deliveries_per_s:,.0f}/s" if burst else "") + ")")
    else:
        out.append("\n  no fixed-rate step passed (no loss, p99 within bound): no ratio to the baselines")
    worst = max((s.queries_per_batch for s in steps if s.queries_per_batch is not None), default=None)
    worst_rt = max((s.round_trips_per_batch for s in steps if s.round_trips_per_batch is not None), default=None)
    shown = best or next((s for s in steps if s.changes_per_batch), None)
    if shown is not None and shown.changes_per_batch:
        batch = shown.changes_per_batch
        theirs = "; ".join(f"{b.kind} {b.round_trips_per_change * batch:,.0f}" for b in baselines)
        out.append(f"  round trips per change batch at the {shown.label} step ({batch:.1f} changes per batch): ours "
                   f"{fmt(shown.round_trips_per_batch, '.1f')} (replicator + hub; {fmt(shown.queries_per_batch, '.1f')} "
                   f"replicator queries), " + (theirs or "no baseline"))
    summary.update(worst_queries_per_batch=worst, worst_round_trips_per_batch=worst_rt,
                   best_deliveries_per_s=best.deliveries_per_s if best else None)

    out.append("\n  Targets:")
    measured = [s for s in steps if s.rls_runs]
    ok = bool(measured) and worst is not None and worst <= QUERIES_PER_BATCH_TARGET and all(
        s.hub_per_batch is not None and s.hub_per_batch + (s.queries_per_batch or 0) <= QUERIES_PER_BATCH_TARGET
        for s in measured)
    out.append(f"    <= {QUERIES_PER_BATCH_TARGET:g} RLS queries per change batch ({args.sockets:,} sockets, {args.users:,} "
               f"users), the hub's fallback statements included: worst {fmt(worst, '.1f')} + hub "
               f"{fmt(max((s.hub_per_batch or 0 for s in measured), default=None), '.1f')} (round trips "
               f"{fmt(worst_rt, '.1f')}) -> "
               f"{'PASS' if ok else 'FAIL'}")
    summary["queries_ok"] = ok
    if best is None:
        out.append(f"    >= {DELIVERIES_TARGET:,.0f} authorized deliveries/s with p99 <= {args.p99_ms:g} ms: no fixed-rate "
                   "step passed -> FAIL")
    else:
        ok = best.deliveries_per_s >= DELIVERIES_TARGET
        out.append(f"    >= {DELIVERIES_TARGET:,.0f} authorized deliveries/s with p99 <= {args.p99_ms:g} ms, no loss: best "
                   f"passing fixed-rate step {best.label} changes/s: {best.deliveries_per_s:,.0f} deliveries/s, p99 "
                   f"{fmt(best.p99_ms, '.1f')} ms -> {'PASS' if ok else 'FAIL'}")
    for line in issue11_targets(args, steps):
        out.append(line)
    leaks = sum(s.leaked for s in steps)
    out.append(f"    no delivery to a socket whose user does not own the row: {leaks:,} leaks -> "
               f"{'PASS' if steps and leaks == 0 else 'FAIL'}")
    summary["leaks"] = leaks
    summary["steps_ok"] = sum(1 for s in steps if s.ok)
    return out, summary


def issue11_targets(args: argparse.Namespace, steps: list[Step]) -> list[str]:
    """The closing table's targets of issue #11 for the preset that runs them."""
    def at(rate: float) -> Step | None:
        return next((s for s in steps if s.rate == rate), None)

    def verdict(s: Step | None, bound: float) -> str:
        if s is None:
            return "not measured -> FAIL"
        reasons = s.failures(bound)
        return f"p99 {fmt(s.p99_ms, '.1f')} ms, loss {s.loss:,}, leaks {s.leaked:,} -> " + \
            ("PASS" if not reasons else f"FAIL ({', '.join(reasons)})")

    out = []
    if args.preset in ("users1k", "users5k", "users10k", "users1k-own", "users5k-own"):
        bound = 100.0 if args.preset.startswith("users1k") else 250.0
        out.append(f"    issue #11: {args.sockets:,} sockets of {args.users:,} users at 100 changes/s, every row to its "
                   f"owner only, p99 <= {bound:g} ms: {verdict(at(100), bound)}")
    if args.preset in ("users1k", "users1k-own"):
        top = max((s for s in steps if s.rate and not s.failures(250.0)), key=lambda s: s.rate, default=None)
        out.append(f"    issue #11: sustained >= 1,000 changes/s with p99 <= 250 ms: highest passing step "
                   f"{top.label if top else '-'} changes/s -> {'PASS' if top and top.rate >= 1000 else 'FAIL'}")
    return out


# --- main ---------------------------------------------------------------------------------------


# (full run, --quick) of the step options shared with postgres_changes.py
STEP_DEFAULTS: dict[str, tuple[float, float]] = {
    "duration": (10.0, 2.0), "max_duration": (5.0, 2.0), "max_rows": (1500, 300),
    "drain_limit": (30.0, 10.0), "drain_limit_max": (90.0, 20.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="row level security postgres_changes benchmark (see module docstring).")
    p.add_argument("--quick", action="store_true", help="small run, about two minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), help="issue #11 scenario (sockets, users, rates, p99 bound)")
    p.add_argument("--sockets", type=int, help="subscribed sockets (default 1000; quick: 200)")
    p.add_argument("--users", type=int, help="distinct users (claim sets) the sockets are spread over (default 10)")
    pb.add_step_args(p, STEP_DEFAULTS, "10 40 100 200 0")
    p.add_argument("--p99-ms", type=float, help="p99 bound of a passing step (default 150)")
    p.add_argument("--filter-owner", action="store_true", default=None,
                   help="each socket filters user_id=eq.<its user's uuid> (the -own presets)")
    p.add_argument("--baseline-changes", type=int, help="changes checked by the baselines (default 20; quick: 5)")
    p.add_argument("--baseline-passes", type=int, help="passes of each baseline, the fastest counts (default 3; quick: 1)")
    p.add_argument("--baseline-seconds", type=float, help="cap of one baseline pass, whole changes (default 30; quick: 10)")
    p.add_argument("--baselines", nargs="*", choices=("naive", "reference"), default=["naive", "reference"],
                   help="baselines to measure (default both; bare flag: none)")
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 900; quick: 240)")
    pb.add_common_args(p)
    args = p.parse_args(argv)
    q = args.quick
    preset = PRESETS[args.preset or "users10"]
    args.sockets = args.sockets or (200 if q and not args.preset else preset["sockets"])
    args.users = args.users or (min(10, args.sockets) if not args.preset else preset["users"])
    if args.users < 1 or args.sockets < args.users:
        p.error("need at least one user and one socket per user")
    pb.step_defaults(args, STEP_DEFAULTS, preset["rates"])
    args.p99_ms = args.p99_ms or preset["p99_ms"]
    args.filter_owner = bool(args.filter_owner or preset.get("filter_owner"))
    args.baseline_changes = args.baseline_changes or (5 if q else 20)
    args.baseline_passes = args.baseline_passes or (1 if q else 3)
    args.baseline_seconds = args.baseline_seconds or (10.0 if q else 30.0)
    args.timeout = args.timeout or ((240.0 if q else 900.0) + args.sockets / 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"rls bench: {args.sockets:,} sockets over {args.users:,} users; rates="
          f"{pb.rates_text(args.rates)} step={args.duration:g}s max step="
          f"{args.max_duration:g}s or {args.max_rows:,} rows; p99 bound {args.p99_ms:g} ms; baselines "
          f"{' '.join(args.baselines) or 'none'} over {args.baseline_changes} changes", flush=True)

    def body(bench: pb.Bench) -> None:
        assert isinstance(bench, Bench)
        bench.drop_stale()
        bench.setup_table()
        ids = bench.baseline_rows(args.baseline_changes)
        if "reference" in args.baselines:
            bench.create_reference()
        for kind in args.baselines:
            print(f"\n== {kind} baseline: {args.baseline_changes} changes x {args.sockets:,} subscriptions, "
                  f"{args.baseline_passes} pass(es) of at most {args.baseline_seconds:g}s ...", flush=True)
            if kind == "naive":
                b = bench.naive(ids, args.sockets, args.baseline_passes, args.baseline_seconds)
            else:
                b = bench.reference(ids, args.baseline_passes, args.baseline_seconds)
            bench.baselines.append(b)
            print(f"  fastest pass: {b.checks:,} checks over {b.changes} changes in {b.seconds:.2f}s = "
                  f"{b.checks_per_s:,.0f} checks/s ({b.visible:,} visible) -> ceiling {b.ceiling:,.0f} authorized "
                  "deliveries/s" + (f"  ERROR: {b.error}" if b.error else ""), flush=True)
        bench.create_slot(bench.slot)
        bench.start_writer()
        print_legend()
        bench.run_steps()

    def report(bench: pb.Bench | None, log_dir: Path) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
        assert bench is None or isinstance(bench, Bench)
        lines, summary = summary_lines(args, bench)
        records: list[dict[str, Any]] = []
        if bench is not None:
            common = {"sockets": args.sockets, "users": args.users}
            records = [{"kind": "baseline", **common, **b.record()} for b in bench.baselines]
            records += [{"kind": "step", **common, **s.record()} for s in bench.steps]
        return lines, records, summary

    return pb.run("rls", args, lambda env, log_dir: Bench(args, env, log_dir), body, report)


if __name__ == "__main__":
    sys.exit(main())
