"""postgres_changes benchmark: commit-to-client latency, loss and throughput of INSERT changes.

The script recreates ``public.bench_rows (id bigint primary key, k int, payload text, sent_ns
bigint)`` in a publication of this run's own, and runs one replicator (``manage.py replicate
--no-broadcasts`` on a slot of its own) and one daphne server (``manage.py runserver``, restarted for
each subscriber count) as subprocesses (``bench/_pgbench.py``); slot, publication and table are
dropped at the end. Subscribers are held by load-generator processes (``bench/_pgload.py sub``) and
rows are written by another process (``bench/_pgload.py writer``), so no client work shares the
server's or the replicator's interpreter. Ids only grow; each row's ``k`` is ``id % subs`` in the
filtered configurations.

For each subscriber count (1 and 100 unfiltered; 1,000 sockets that each filter ``k=eq.N`` on a
different N, so each change matches exactly one socket) the writer inserts at 100 and 1,000
changes/s and then as fast as it can, for a fixed time per step. Every step reports latency
percentiles (receipt minus ``sent_ns``, the writer's clock just before the statement that commits
the row), delivered vs expected, duplicates (per socket: an id at or below the last one it got),
the writer's achieved rate, the end-to-end change rate and the CPU used by every process involved.
A step passes only with no loss, no duplicates, the writer within 1% of its target rate and p99
within its bound.

Throughput, the PASS figure for ">= 10,000 changes/s decoded, filtered and published": 100 sockets
(``--throughput-subs``) each filtering ``k=eq.N``, the server running, the replicator stopped while
``--throughput-rows`` rows are written, then started: changes/s from the moment it holds its slot
until every row reached its one socket (and until the slot is confirmed past the last row), with
no loss and no duplicates.

Ceilings, measured before any server starts over one pre-written batch: how fast this PostgreSQL
drains the batch through a pgoutput slot with nothing downstream, and how fast the replicator
decodes and publishes the same backlog to groups nobody listens to (``group_send`` to an empty
group: no subscriber, no frame, nothing crosses Redis to a server). Printed as ceilings, never as
the PASS figure.

Text and JSON (one object per step, one summary object; ``bench/compare.py OLD NEW``) go to the log
folder.

Usage::

    .venv/bin/python bench/postgres_changes.py --quick
    .venv/bin/python bench/postgres_changes.py
    .venv/bin/python bench/postgres_changes.py --subs 100 --rates 1000 --duration 20 --profile 100
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import _pgbench as pb  # noqa: E402
import broadcast as bc  # noqa: E402

TABLE = "bench_rows"
P50_TARGET_MS = 15.0
P99_TARGET_MS = 100.0
TARGET_RATE = 1000
TARGET_SUBS = 100
REPLICATOR_TARGET = 10_000.0
fmt = pb.fmt


# --- results ---------------------------------------------------------------------------


@dataclass
class Step(pb.Delivery):
    subs: int = 0
    filtered: bool = False
    changes_per_s: float = 0.0
    repl_rate: float | None = None
    wall_s: float = 0.0
    misrouted: int = 0
    profiled: bool = False

    def failures(self, bound_ms: float | None = None) -> list[str]:
        out = super().failures(bound_ms)
        if self.misrouted:
            out.append(f"{self.misrouted:,} misrouted")
        return out


@dataclass
class Throughput:
    """The replicator's backlog drained to real subscribers (filters on, through Redis)."""

    subs: int = 0
    joined: int = 0
    rows: int = 0
    insert_rate: float = 0.0
    expected: int = 0
    received: int = 0
    duplicates: int = 0
    misrouted: int = 0
    repl_s: float | None = None  # holding the slot -> slot confirmed past the last row
    delivered_s: float | None = None  # holding the slot -> the last row received
    cpu: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def loss(self) -> int:
        return max(0, self.expected - (self.received - self.duplicates))

    @property
    def repl_rate(self) -> float | None:
        return self.rows / self.repl_s if self.repl_s else None

    @property
    def rate(self) -> float | None:
        """Changes/s decoded, filtered, published and delivered: the PASS figure."""
        return self.rows / self.delivered_s if self.delivered_s and not self.loss else None

    def failures(self) -> list[str]:
        out = [self.error] if self.error else []
        if self.received == 0 or self.loss:
            out.append(f"loss {self.loss:,}")
        if self.duplicates:
            out.append(f"{self.duplicates:,} duplicates")
        if self.misrouted:
            out.append(f"{self.misrouted:,} misrouted")
        if self.rate is None or self.rate < REPLICATOR_TARGET:
            out.append(f"{fmt(self.rate, ',.0f')} < {REPLICATOR_TARGET:,.0f} changes/s")
        return out

    def record(self) -> dict[str, Any]:
        # No "rate" key: bench/compare.py matches steps on it (a target rate).
        return {"kind": "throughput", **asdict(self), "loss": self.loss, "repl_changes_per_s": self.repl_rate,
                "changes_per_s": self.rate, "ok": not self.failures(), "failures": self.failures()}


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


class Bench(pb.Bench):
    slot_prefix = "bench_pgc_"
    layer_prefix = "rtbenchpg"

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(args, env, log_dir)
        self.ceiling_slot = f"{self.slot}_ceil"
        self.profiles: list[str] = []
        self.steps: list[Step] = []
        self.ceiling: Ceiling | None = None
        self.throughput: Throughput | None = None

    def setup_table(self) -> None:
        from psycopg import sql

        # k right after id: the subscribers read it there (``_pgload``); sent_ns stays last.
        self.create_table(TABLE, "id bigint PRIMARY KEY, k int, payload text, sent_ns bigint")
        self.sql(sql.SQL("GRANT SELECT ON {} TO anon").format(sql.Identifier("public", TABLE)))
        self.create_publication(self.args.publication, TABLE)

    def start_subscribers(self, n: int, filtered: bool) -> tuple[int, set[int]]:
        """``n`` sockets over the workers, each filtering ``k=eq.N`` (N in 0..n-1) when ``filtered``."""
        k = max(1, min(self.args.workers, n))
        configs = []
        for i in range(k):
            if filtered:
                part = list(range(n))[i::k]
                configs.append({"count": len(part), "filter_ids": part, "filter_column": "k"})
            else:
                configs.append({"count": n // k + (1 if i < n % k else 0), "filter_ids": None})
        joined = self.start_workers(configs, f"subs-{n}.log")
        joined_ids = {int(i) for w in self.workers for i in w.info.get("joined_ids", [])}
        return joined, joined_ids

    # --- measurements -----------------------------------------------------

    def ceilings(self) -> Ceiling:
        """pgoutput drain rate and the replicator's backlog drain to empty groups, over one pre-written batch."""
        c = self.ceiling = Ceiling(rows=self.args.ceiling_rows)
        assert self.writer is not None
        self.create_slot(self.ceiling_slot)
        self.create_slot(self.slot)
        print(f"  writing {c.rows:,} rows in {self.args.bulk_batch}-row transactions ...", flush=True)
        reply = self.write(pb.Delivery("backlog", 0), 0, self.next_id, rows=c.rows, max_batch=self.args.bulk_batch)
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
              "same backlog (no server: every group_send goes to an empty group) ...", flush=True)
        spawned = time.monotonic()
        active = self.start_replicator()
        spy = self.start_pyspy("replicator-backlog", self.replicator.pid if self.replicator else 0, self.args.profile_seconds) \
            if self.args.profile_backlog else None
        s0 = self.cpu_snapshot()
        done = self.wait_confirmed(end_lsn, active + self.args.drain_limit_backlog)
        cpu = self.cpu_delta(s0, self.cpu_snapshot())
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

    def wait_confirmed(self, lsn: int, deadline: float) -> float | None:
        """When (monotonic) the slot was confirmed past ``lsn``; None if not by ``deadline``."""
        while time.monotonic() < deadline:
            if self.confirmed_lsn() > lsn:
                return time.monotonic()
            if self.replicator is not None and self.replicator.poll() is not None:
                raise pb.BenchError(f"replicator exited: {self.log_tail(self.replicator_log)}")
            time.sleep(0.01)
        return None

    def run_throughput(self, subs: int) -> Throughput:
        """The replicator's rate with real subscribers: a backlog drained to ``subs`` filtered sockets."""
        t = self.throughput = Throughput(subs=subs, rows=self.args.throughput_rows)
        self.start_server()
        try:
            t.joined, joined_ids = self.start_subscribers(subs, filtered=True)
            print(f"\n== throughput: {t.joined}/{subs} sockets each filtering k=eq.N; writing {t.rows:,} rows "
                  f"(k = id % {subs}) with the replicator stopped ...", flush=True)
            if t.joined == 0:
                raise pb.BenchError("no subscriber joined")
            if not self.quiesce(20):
                t.error = "previous deliveries still arriving"
            self.stop_replicator()
            self.step_id += 1
            step_id, id_base = self.step_id, self.next_id
            reply = self.write(pb.Delivery("backlog", 0), step_id, id_base, rows=t.rows,
                               max_batch=self.args.bulk_batch, k_mod=subs)
            t.insert_rate = float(reply["rate"])
            t.expected = sum(pb.residue_count(id_base, t.rows, subs, n) for n in joined_ids)
            end_lsn = self.marker()
            active = self.start_replicator()
            active_ns = time.time_ns()
            s0 = self.cpu_snapshot()
            confirmed = self.wait_confirmed(end_lsn, active + self.args.drain_limit_backlog)
            self.wait_delivered(step_id, t.expected, end_lsn, time.monotonic(), self.args.drain_limit)
            t.cpu = self.cpu_delta(s0, self.cpu_snapshot())
            replies = [w.expect({"cmd": "stats", "step": step_id}, 20) for w in self.workers]
            t.received = sum(int(r["recv"]) for r in replies)
            t.duplicates = sum(int(r.get("dups", 0)) for r in replies)
            t.misrouted = self.worker_counters().get("misrouted", 0)
            last_ns = max([int(r["last_ns"]) for r in replies if r["recv"]] or [0])
            if confirmed is None:
                t.error = f"slot not confirmed past the backlog within {self.args.drain_limit_backlog:.0f}s"
                self.reset_replicator("throughput backlog not drained in time")
            else:
                t.repl_s = confirmed - active
            if last_ns:
                t.delivered_s = max(1e-6, (last_ns - active_ns) / 1e9)
        finally:
            self.stop_workers()
            self.stop_server()
        print(f"  {t.received - t.duplicates:,}/{t.expected:,} delivered (loss {t.loss:,}, duplicates {t.duplicates:,}, "
              f"misrouted {t.misrouted:,}); slot confirmed after {fmt(t.repl_s, '.2f')}s, last row received after "
              f"{fmt(t.delivered_s, '.2f')}s -> {fmt(t.rate, ',.0f')} changes/s", flush=True)
        return t

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

    def step(self, subs: int, filtered: bool, joined_ids: set[int], rate: float, duration: float,
             drain_limit: float, profile: bool) -> Step:
        assert self.writer is not None and self.server is not None
        label = f"{rate:g}" if rate else "max"
        st = Step(label, rate, duration=duration if rate else 0.0, subs=subs, filtered=filtered,
                  p99_bound_ms=P99_TARGET_MS)
        if not self.quiesce(20):
            if self.confirmed_lsn() <= self.last_marker_lsn:
                self.reset_replicator("replicator still behind before a step")
            st.note = "previous backlog not drained"
        status = [w.rpc({"cmd": "status"}) for w in self.workers]
        st.receivers = sum(int(s["open"]) for s in status)
        misrouted_before = sum(int(s["counters"].get("misrouted", 0)) for s in status)
        self.step_id += 1
        step_id, id_base = self.step_id, self.next_id
        spies = []
        if profile:
            secs = self.args.profile_seconds
            spies = [self.start_pyspy(f"server-{subs}-{label}", self.server.pid, secs),
                     self.start_pyspy(f"replicator-{subs}-{label}", self.replicator.pid if self.replicator else 0, secs)]
            st.profiled = True
        s0 = self.cpu_snapshot()
        t0 = time.monotonic()
        reply = self.write(st, step_id, id_base, rows=0 if rate else self.args.max_rows, k_mod=subs if filtered else 0)
        marker_lsn = self.marker()
        written = time.monotonic()
        if filtered:
            st.expected = sum(pb.residue_count(id_base, st.rows, subs, n) for n in joined_ids)
        else:
            st.expected = st.rows * st.receivers
        caught_up_at = self.wait_delivered(step_id, st.expected, marker_lsn, written, drain_limit, st)
        s1 = self.cpu_snapshot()
        st.wall_s = time.monotonic() - t0
        st.cpu = self.cpu_delta(s0, s1)
        window = self.gather(st, step_id, reply)
        fanout = 1 if filtered else max(1, st.receivers)
        st.changes_per_s = (st.received - st.duplicates) / fanout / window
        st.caught_up = caught_up_at is not None
        if caught_up_at is not None:
            st.lag_s = max(0.0, caught_up_at - written)
            st.repl_rate = st.rows / max(1e-6, caught_up_at - t0)
        st.misrouted = self.worker_counters().get("misrouted", 0) - misrouted_before
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

    def run_config(self, subs: int, filtered: bool) -> None:
        with self.serving():
            started = time.monotonic()
            joined, joined_ids = self.start_subscribers(subs, filtered)
            kind = f"each filtering k=eq.N for N in 0..{subs - 1}" if filtered else "unfiltered"
            print(f"\n== {subs} subscriber(s), {kind}: {joined}/{subs} subscribed in {time.monotonic() - started:.1f}s",
                  flush=True)
            if joined == 0:
                raise pb.BenchError("no subscriber joined")
            print("  " + STEP_HEADER, flush=True)
            self.run_rates(lambda rate, duration, drain: self.step(
                subs, filtered, joined_ids, rate, duration, drain,
                profile=rate == self.args.profile_rate and subs in self.args.profile), step_row, 60)


# --- output ---------------------------------------------------------------------------------

CPU_KEYS = ("server", "repl", "replPG", "pg", "redis", "subs", "writer", "writPG", "others", "machine")
STEP_HEADER = (f"{'subs':>5} {'rate':>5} {'rows':>8} {'write/s':>8} {'r/txn':>5} {'cmt p50':>7} {'expected':>9} "
               f"{'received':>9} {'loss':>8} {'dups':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'chg/s':>7} {'dlv/s':>8} "
               f"{'lag s':>6}  CPU% " + pb.cpu_header(CPU_KEYS))


def step_row(s: Step) -> str:
    cpu = pb.cpu_cells(s.cpu, CPU_KEYS)
    flags = ("  *py-spy" if s.profiled else "") + (f"  misrouted={s.misrouted}" if s.misrouted else "") \
        + (f"  ({s.note})" if s.note else "") + ("" if s.caught_up else "  (replicator behind)")
    return (f"{s.subs:>5}{'f' if s.filtered else ' '}{s.label:>5} {s.rows:>8,} {s.write_rate:>8,.0f} {s.rows_per_commit:>5.0f} "
            f"{fmt(s.commit_p50_ms, '.1f'):>7} {s.expected:>9,} {s.received:>9,} {s.loss:>8,} {s.duplicates:>5,} "
            f"{fmt(s.p50_ms, '.1f'):>7} {fmt(s.p99_ms, '.1f'):>7} {s.max_ms:>8.1f} {s.changes_per_s:>7,.0f} "
            f"{s.deliveries_per_s:>8,.0f} {fmt(s.lag_s, '.1f'):>6}       {cpu}{flags}")


def summary_lines(args: argparse.Namespace, bench: Bench | None) -> tuple[list[str], dict[str, Any]]:
    ceiling = bench.ceiling if bench else None
    through = bench.throughput if bench else None
    steps = bench.steps if bench else []
    out = ["", "=" * 120, "Summary"]
    summary: dict[str, Any] = {"subs": args.subs, "rates": args.rates, "duration_s": args.duration}
    if through is not None:
        out.append(f"\n  Replicator throughput with real subscribers ({through.joined} sockets each filtering k=eq.N, "
                   f"through Redis to one server), a {through.rows:,}-row backlog: {through.received - through.duplicates:,}"
                   f"/{through.expected:,} delivered, loss {through.loss:,}, duplicates {through.duplicates:,}; slot "
                   f"confirmed after {fmt(through.repl_s, '.2f')}s ({fmt(through.repl_rate, ',.0f')} changes/s), last row "
                   f"received after {fmt(through.delivered_s, '.2f')}s ({fmt(through.rate, ',.0f')} changes/s); CPU "
                   f"server {through.cpu.get('server', 0):.0f}%, replicator {through.cpu.get('repl', 0):.0f}%, "
                   f"redis {through.cpu.get('redis', 0):.0f}%"
                   + (f"; error: {through.error}" if through.error else ""))
        summary["throughput"] = {"rate": through.rate, "repl_rate": through.repl_rate, "loss": through.loss,
                                 "duplicates": through.duplicates, "ok": not through.failures()}
    if ceiling is not None:
        out.append(f"\n  Ceilings over {ceiling.rows:,} pre-written rows ({args.bulk_batch} rows per transaction, "
                   f"inserted at {ceiling.insert_rate:,.0f} rows/s), before any server starts:")
        out.append(f"    pgoutput slot drained by PostgreSQL, nothing downstream: "
                   f"{fmt(ceiling.pgoutput_rate, ',.0f')} changes/s ({ceiling.pgoutput_messages:,} messages in "
                   f"{fmt(ceiling.pgoutput_s, '.2f')}s)")
        out.append(f"    empty-group ceiling: replicator decode + publish of the same backlog to groups nobody "
                   f"listens to: {fmt(ceiling.repl_rate, ',.0f')} changes/s ({fmt(ceiling.repl_s, '.2f')}s after taking "
                   f"the slot, {fmt(ceiling.repl_total_s, '.2f')}s from spawn; replicator CPU "
                   f"{fmt(ceiling.repl_cpu_pct, '.0f')}%, its PostgreSQL backend {fmt(ceiling.repl_backend_cpu_pct, '.0f')}%, "
                   f"redis {fmt(ceiling.redis_cpu_pct, '.0f')}%)" + (f"  {ceiling.error}" if ceiling.error else ""))
        summary["ceiling"] = {"pgoutput_rate": ceiling.pgoutput_rate, "empty_group_rate": ceiling.repl_rate}
    if steps:
        out.append(f"\n  {'subscribers':<18} {'rate':>6} {'rows':>8} {'write/s':>8} {'expected':>10} {'delivered':>10} "
                   f"{'loss':>8} {'dups':>5} {'p50 ms':>7} {'p99 ms':>7} {'changes/s':>10} {'deliveries/s':>12} "
                   f"{'srv CPU':>7} {'repl CPU':>8}  verdict")
        for s in steps:
            who = f"{s.subs} " + ("filtered k=eq.N" if s.filtered else "unfiltered")
            out.append(f"  {who:<18} {s.label:>6} {s.rows:>8,} {s.write_rate:>8,.0f} {s.expected:>10,} "
                       f"{s.received - s.duplicates:>10,} {s.loss:>8,} {s.duplicates:>5,} {fmt(s.p50_ms, '.1f'):>7} "
                       f"{fmt(s.p99_ms, '.1f'):>7} {s.changes_per_s:>10,.0f} {s.deliveries_per_s:>12,.0f} "
                       f"{s.cpu.get('server', 0):>6.0f}% {s.cpu.get('repl', 0):>7.0f}%  {s.verdict()}"
                       + ("  *py-spy" if s.profiled else ""))
        out.append("  (a step passes only with no loss, no duplicates, the writer within 1% of its target rate and "
                   f"p99 <= {P99_TARGET_MS:g} ms; the max step is a burst, shown for what it delivered and when)")
        for s in steps:
            if s.rate == 0:
                out.append(f"  max step, {s.subs} {'filtered' if s.filtered else 'unfiltered'}: {s.rows:,} rows written at "
                           f"{s.write_rate:,.0f}/s; {s.received - s.duplicates:,} of {s.expected:,} deliveries "
                           f"({100 * (s.received - s.duplicates) / max(1, s.expected):.1f}%) received between "
                           f"{fmt(s.first_s, '.2f')}s and {fmt(s.last_s, '.2f')}s after the first commit; replicator "
                           + (f"caught up {fmt(s.lag_s, '.1f')}s after the writer stopped" if s.caught_up
                              else "had not caught up")
                           + f"; the bench stopped waiting {fmt(s.ended_s, '.1f')}s after the writes ({s.end_reason})")
    out.append("\n  Targets:")
    target = next((s for s in steps if s.subs == TARGET_SUBS and not s.filtered and s.rate == TARGET_RATE), None)
    head = (f"    p50 <= {P50_TARGET_MS:g} ms and p99 <= {P99_TARGET_MS:g} ms at {TARGET_RATE:,} changes/s with "
            f"{TARGET_SUBS} subscribers, no loss, no duplicates, writer on rate")
    if target is None:
        out.append(f"{head}: not measured in this run -> FAIL")
        summary["latency_ok"] = False
    else:
        reasons = target.failures()
        if target.p50_ms is None or target.p50_ms > P50_TARGET_MS:
            reasons.append(f"p50 {fmt(target.p50_ms, '.1f')} > {P50_TARGET_MS:g} ms")
        out.append(f"{head}: p50 {fmt(target.p50_ms, '.1f')} ms, p99 {fmt(target.p99_ms, '.1f')} ms, loss {target.loss:,}, "
                   f"duplicates {target.duplicates:,}, writer {target.write_rate:,.0f}/s -> "
                   + ("PASS" if not reasons else f"FAIL ({', '.join(reasons)})"))
        summary["latency_ok"] = not reasons
    head = (f"    >= {REPLICATOR_TARGET:,.0f} changes/s decoded, filtered and published by one replicator to "
            f"{args.throughput_subs} filtered subscribers through Redis, no loss, no duplicates")
    if through is None:
        out.append(f"{head}: not measured in this run -> FAIL")
    else:
        reasons = through.failures()
        out.append(f"{head}: {fmt(through.rate, ',.0f')} changes/s -> " + ("PASS" if not reasons else f"FAIL ({', '.join(reasons)})"))
    summary["throughput_ok"] = through is not None and not through.failures()
    if ceiling and ceiling.pgoutput_rate and through and through.rate:
        out.append(f"    (with subscribers the replicator reaches {100 * through.rate / ceiling.pgoutput_rate:.0f}% of the "
                   f"pgoutput ceiling of this PostgreSQL and {100 * through.rate / (ceiling.repl_rate or through.rate):.0f}% "
                   f"of its own empty-group ceiling)")
    summary["steps_ok"] = sum(1 for s in steps if s.ok)
    summary["steps"] = len(steps)
    return out, summary


def print_legend() -> None:
    print("columns: subs (f = filtered), rate = target changes/s (max = as fast as the writer can), rows = rows "
          "inserted, write/s = writer's achieved rate (rows over the scheduled time, or over "
          "the time it took to start its last statement plus one interval if that was later), r/txn = rows per transaction, cmt p50 = writer's statement + "
          "commit time (ms, included in latency), expected/received/loss = deliveries (loss = not received by the end of "
          "the step: the writing time plus up to the drain limit), dups = duplicates (a socket got an id at or below "
          "its last one), p50/p99/max = commit-to-client latency, chg/s = distinct changes delivered per second from "
          "first commit to last receipt, dlv/s = deliveries per second, lag s = seconds after the writer stopped until "
          "the slot passed its last row; CPU% of one core: server, repl = replicator, replPG = the replicator's "
          "PostgreSQL backend (decoding), pg = other PostgreSQL processes, redis, subs = subscriber processes, writer, "
          "writPG = writer's backend, others = every other user process (py-spy included); machine = busy time of all "
          "CPUs including kernel threads (% of all cores)", flush=True)


# --- main ---------------------------------------------------------------------------------------


# (full run, --quick) of the step options shared with rls.py
STEP_DEFAULTS: dict[str, tuple[float, float]] = {
    "duration": (10.0, 1.5), "max_duration": (5.0, 1.5), "max_rows": (150_000, 10_000),
    "drain_limit": (30.0, 5.0), "drain_limit_max": (60.0, 6.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="postgres_changes benchmark (see module docstring).")
    p.add_argument("--quick", action="store_true", help="small run, about two minutes")
    p.add_argument("--subs", type=int, nargs="*", help="subscriber counts (default 1 100 1000; quick: 1 20 100; "
                   "bare flag: ceilings and throughput only)")
    p.add_argument("--filtered-from", type=int, help="counts >= this use one k=eq.N filter per socket "
                   "(default 1000; quick: 100)")
    pb.add_step_args(p, STEP_DEFAULTS, "100 1000 0")
    p.add_argument("--drain-limit-backlog", type=float, help="max seconds for the replicator to drain a backlog "
                   "(default 180; quick: 30)")
    p.add_argument("--ceiling-rows", type=int, help="rows pre-written for the ceilings (default 200000; quick: 20000)")
    p.add_argument("--throughput-subs", type=int, default=100, help="filtered sockets of the throughput run (default 100)")
    p.add_argument("--throughput-rows", type=int, help="backlog of the throughput run (default 100000; quick: 10000)")
    p.add_argument("--skip-throughput", action="store_true", help="no throughput run")
    p.add_argument("--bulk-batch", type=int, default=1000, help="rows per transaction of the pre-written batches")
    p.add_argument("--profile", type=int, nargs="*", help="py-spy the server and replicator during one step at "
                   "these subscriber counts (default 100 1000; quick: none; bare flag: all)")
    p.add_argument("--profile-rate", type=float, default=0, help="the step to profile (default 0 = the max step)")
    p.add_argument("--backlog-profile", choices=("on", "off"),
                   help="py-spy the replicator while it drains the ceiling backlog (default on; quick: off)")
    p.add_argument("--profile-seconds", type=float, help="py-spy duration (default 10; quick: 1.5)")
    p.add_argument("--skip-ceilings", action="store_true", help="no ceilings")
    p.add_argument("--timeout", type=float, help="global time budget in seconds (default 1800; quick: 150)")
    pb.add_common_args(p)
    args = p.parse_args(argv)
    q = args.quick
    if args.subs is None:
        args.subs = [1, 20, 100] if q else [1, 100, 1000]
    args.filtered_from = args.filtered_from or (100 if q else 1000)
    pb.step_defaults(args, STEP_DEFAULTS, [100, 1000, 0])
    args.drain_limit_backlog = args.drain_limit_backlog or (30.0 if q else 180.0)
    args.ceiling_rows = args.ceiling_rows or (20_000 if q else 200_000)
    args.throughput_rows = args.throughput_rows or (10_000 if q else 100_000)
    args.profile_seconds = args.profile_seconds or (2.0 if q else 10.0)
    if args.profile is None:
        args.profile = [] if q else [100, 1000]
    elif not args.profile:
        args.profile = list(args.subs)
    if args.skip_ceilings and args.skip_throughput and not args.subs:
        p.error("nothing to run")
    args.profile_backlog = (args.backlog_profile or ("off" if q else "on")) == "on"
    args.timeout = args.timeout or (150.0 if q else 1800.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"postgres_changes bench: subscribers={' '.join(map(str, args.subs))} (filtered from {args.filtered_from}) "
          f"rates={pb.rates_text(args.rates)} step={args.duration:g}s "
          f"max step={args.max_duration:g}s or {args.max_rows:,} rows; ceiling rows={args.ceiling_rows:,}; "
          f"throughput: {args.throughput_subs} filtered sockets, {args.throughput_rows:,} rows", flush=True)

    def body(bench: pb.Bench) -> None:
        assert isinstance(bench, Bench)
        bench.ensure_roles()
        bench.drop_stale()
        bench.setup_table()
        bench.start_writer()
        if args.skip_ceilings:
            bench.create_slot(bench.slot)
            bench.start_replicator()
        else:
            print("\n== ceilings", flush=True)
            bench.ceilings()
        if not args.skip_throughput:
            try:
                bench.run_throughput(args.throughput_subs)
            except (bc.BenchError, OSError) as error:
                print(f"  [throughput] ERROR: {error}", flush=True)
                if bench.throughput is not None:
                    bench.throughput.error = str(error)
                if bench.replicator is None:
                    bench.advance_slot()
                    bench.start_replicator()
        print_legend()
        for n in args.subs:
            if time.monotonic() > args.deadline - 60:
                print(f"skipping {n} subscribers: time budget spent", flush=True)
                continue
            bench.run_config(n, filtered=n >= args.filtered_from)

    def report(bench: pb.Bench | None, log_dir: Path) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
        assert bench is None or isinstance(bench, Bench)
        lines, summary = summary_lines(args, bench)
        records: list[dict[str, Any]] = []
        if bench is not None:
            records = [{"kind": "step", **s.record()} for s in bench.steps]
            if bench.throughput is not None:
                records.append(bench.throughput.record())
            lines += ["\n" + profile for profile in bench.profiles]
        return lines, records, summary

    return pb.run("postgres_changes", args, lambda env, log_dir: Bench(args, env, log_dir), body, report)


if __name__ == "__main__":
    sys.exit(main())
