"""Load generator for ``bench/postgres_changes.py``: postgres_changes subscribers and the row writer.

``sub`` workers open COUNT sockets, join each to ``realtime:bench`` with one
postgres_changes INSERT binding on ``public.bench_rows`` (unfiltered, or
``<filter_column>=eq.N`` with a different N per socket, ``filter_ids``), wait
for the "Subscribed to PostgreSQL" system push, then count the changes they
receive with a latency histogram per step. The row's ``payload`` starts with
``<step>|`` and its ``sent_ns`` column holds the writer's ``time.time_ns()``
just before the statement that commits it, so latency = receipt - sent_ns
includes the commit. Ids only grow, so a socket that receives an id at or
below the last one it got counts a duplicate (``dups`` of the step), and a
filtered socket that receives a row whose filter column differs counts it
``misrouted``.

Optional, for other tables and row level security (``bench/rls.py``):
``table`` (default ``bench_rows``), ``users`` (``seed``, ``count``, ``role``,
``iat``, ``exp``) and ``user_of`` (one user index per socket): the worker
mints each user's token itself from ``JWT_SECRET`` (same claims, so every
socket of a user sends the very same token) and a change whose ``user_id``
is not the socket's owner is counted as ``leaked``. User i's uuid is
``owner_uuid(seed, i)``, which PostgreSQL computes the same way
(``md5(seed || ':' || i)::uuid``).

The ``writer`` inserts rows into ``bench_rows`` (or ``table``) at a target rate
(or as fast as it can) in batched statements, one row per change. With
``k_mod`` it fills the ``k`` column with ``id % k_mod``; with ``users`` each
row's ``user_id`` is ``owner_uuid(seed, id % count)`` (NULL for the negative
ids of markers).

Both are driven by JSON lines on stdin and answer with JSON lines on stdout.
Usage: ``python bench/_pgload.py sub|writer @CONFIG_FILE`` (or the JSON itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _loadgen as lg  # noqa: E402

TOPIC = "realtime:bench"
TABLE = "bench_rows"
SUBSCRIBED = b"Subscribed to PostgreSQL"
SENT_KEY = b'"sent_ns":'
PAYLOAD_KEY = b'"payload":"'
ID_KEY = b'"record":{"id":'
OWNER_KEY = b'"user_id":'

FINE_US, FINE_N = 100, 1000
MID_US, MID_N = 10_000, 990
COARSE_US, COARSE_N = 250_000, 480
FINE_END_US = FINE_US * FINE_N
MID_END_US = FINE_END_US + MID_US * MID_N
NBUCKETS = FINE_N + MID_N + COARSE_N


def bucket(lat_us: int) -> int:
    """Histogram index: 0.1 ms buckets to 100 ms, 10 ms to 10 s, 250 ms to 130 s."""
    if lat_us < FINE_END_US:
        return lat_us // FINE_US if lat_us > 0 else 0
    if lat_us < MID_END_US:
        return FINE_N + (lat_us - FINE_END_US) // MID_US
    return min(FINE_N + MID_N + (lat_us - MID_END_US) // COARSE_US, NBUCKETS - 1)


def bucket_upper_ms(index: int) -> float:
    if index < FINE_N:
        return (index + 1) * FINE_US / 1000
    if index < FINE_N + MID_N:
        return (FINE_END_US + (index - FINE_N + 1) * MID_US) / 1000
    return (MID_END_US + (index - FINE_N - MID_N + 1) * COARSE_US) / 1000


def percentile_ms(hist: list[int], total: int, q: float) -> float | None:
    """The q-quantile (upper bucket edge, ms); inf when it falls in the open last bucket."""
    if total <= 0:
        return None
    rank = max(1, -(-int(q * total * 1_000_000) // 1_000_000))
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return float("inf") if index == len(hist) - 1 else bucket_upper_ms(index)
    return float("inf")


def new_stats(now_ns: int) -> list[Any]:
    """[count, first_ns, last_ns, histogram, max_us, duplicates]."""
    return [0, now_ns, now_ns, [0] * NBUCKETS, 0, 0]


def owner_uuid(seed: str, index: int) -> str:
    """User ``index``'s uuid; PostgreSQL: ``md5(seed || ':' || index)::uuid``."""
    return str(uuid.UUID(hashlib.md5(f"{seed}:{index}".encode()).hexdigest()))


def user_claims(users: dict[str, Any], index: int) -> dict[str, Any]:
    """The claims of user ``index`` of a ``users`` spec (``seed``, ``role``, ``iat``, ``exp``)."""
    role = str(users.get("role", "authenticated"))
    return {"aud": role, "role": role, "sub": owner_uuid(str(users["seed"]), index),
            "iat": int(users["iat"]), "exp": int(users["exp"])}


def mint_token(secret: str, claims: dict[str, Any]) -> str:
    import jwt

    return str(jwt.encode(claims, secret, algorithm="HS256"))


def join_frame(filter_id: int | None, table: str = TABLE, access_token: str | None = None,
               filter_column: str = "id", filter_text: str | None = None) -> bytes:
    binding: dict[str, Any] = {"event": "INSERT", "schema": "public", "table": table}
    if filter_id is not None:
        binding["filter"] = f"{filter_column}=eq.{filter_id}"
    elif filter_text is not None:
        binding["filter"] = filter_text
    payload: dict[str, Any] = {"config": {"postgres_changes": [binding]}}
    if access_token is not None:
        payload["access_token"] = access_token
    return json.dumps(["1", "1", TOPIC, "phx_join", payload], separators=(",", ":")).encode()


def wait_subscribed(conn: lg.LiteConn, deadline: float) -> None:
    """Block until the join's ok reply and the "Subscribed to PostgreSQL" push have arrived."""
    replied = False
    while True:
        frame = conn.recv_text(deadline)
        if b'"phx_reply"' in frame and frame.startswith(b'["1","1"'):
            if b'"status":"ok"' not in frame:
                raise lg.HandshakeError("join refused: " + frame[:300].decode("utf-8", "replace"))
            replied = True
        elif b'"system"' in frame:
            if b'"status":"ok"' in frame and SUBSCRIBED in frame:
                if not replied:
                    raise lg.HandshakeError("system push before the join reply")
                return
            if b'"status":"error"' in frame:
                raise lg.HandshakeError("subscription failed: " + frame[:300].decode("utf-8", "replace"))


def socket_count(cfg: dict[str, Any]) -> int:
    return len(cfg["filter_ids"]) if cfg.get("filter_ids") else int(cfg["count"])


def open_subscribed(cfg: dict[str, Any]) -> tuple[list[tuple[lg.LiteConn, int | None, int]], list[str]]:
    """Open and subscribe the worker's sockets, ``batch`` at a time: (conn, filter id, socket index)."""
    host, port, path = cfg["host"], int(cfg["port"]), cfg["path"]
    timeout = float(cfg.get("timeout", 60))
    batch = int(cfg.get("batch", 20))
    table = str(cfg.get("table") or TABLE)
    count = socket_count(cfg)
    ids: list[int | None] = list(cfg["filter_ids"]) if cfg.get("filter_ids") else [None] * count
    column = str(cfg.get("filter_column") or "id")
    user_of: list[int] | None = cfg.get("user_of")
    tokens: list[str | None] = [None] * count
    if user_of is not None and cfg.get("users"):
        secret = os.environ["JWT_SECRET"]
        minted: dict[int, str] = {}
        for i, user in enumerate(user_of):
            if user not in minted:
                minted[user] = mint_token(secret, user_claims(cfg["users"], user))
            tokens[i] = minted[user]
    # ``filter_owner``: each socket subscribes to its own user's rows only (user_id=eq.<its uuid>), as apps do.
    own_filters: list[str | None] = [None] * len(ids)
    if user_of is not None and cfg.get("users") and cfg.get("filter_owner"):
        own_filters = [f"user_id=eq.{owner_uuid(str(cfg['users']['seed']), user)}" for user in user_of]
    opened, errors = lg.open_in_batches(host, port, path, range(len(ids)), batch, timeout, (
        ("join", lambda conn, index, deadline: conn.send(1, join_frame(ids[index], table, tokens[index], column, own_filters[index]))),
        ("wait", lambda conn, index, deadline: wait_subscribed(conn, deadline)),
    ))
    return [(conn, ids[index], index) for conn, index in opened], errors


def run_sub_worker(cfg: dict[str, Any]) -> None:
    started = time.monotonic()
    subscribed, errors = open_subscribed(cfg)
    wanted = socket_count(cfg)
    owners: list[str] | None = None
    if cfg.get("users") and cfg.get("user_of") is not None:
        seed = str(cfg["users"]["seed"])
        owners = [owner_uuid(seed, user) for user in cfg["user_of"]]  # one per socket
    filter_key = f'"{cfg.get("filter_column") or "id"}":'.encode()
    joined_by_owner: dict[str, int] = {}
    if owners:
        for _, _, index in subscribed:
            joined_by_owner[owners[index]] = joined_by_owner.get(owners[index], 0) + 1
    lg.emit({"ready": True, "joined": len(subscribed), "failed": wanted - len(subscribed),
             "joined_ids": [i for _, i, _ in subscribed if i is not None], "joined_by_owner": joined_by_owner,
             "errors": errors[:5], "setup_s": round(time.monotonic() - started, 3)})
    conns = [c for c, _, _ in subscribed]
    want_id: dict[int, int | None] = {c.fd: i for c, i, _ in subscribed}
    last_id: dict[int, int] = {c.fd: -1 for c in conns}  # ids only grow: one at or below the last is a duplicate
    # The bytes that follow ``"user_id":`` in a change this socket may see.
    want_owner: dict[int, bytes] = {c.fd: f'"{owners[index]}"'.encode() for c, _, index in subscribed} if owners else {}
    stats: dict[int, list[Any]] = {}
    counters = {"frames": 0, "changes": 0, "other": 0, "misrouted": 0, "leaked": 0, "closed": 0, "write_errors": 0}
    batch_wait = float(cfg.get("batch_wait_ms", 0.5)) / 1000
    pool = lg.Pool(conns, counters, heartbeat_s=float(cfg.get("heartbeat_s", 30) or 0),
                   batch_wait_s=batch_wait if len(conns) > 64 else 0.0)
    control_frame = pool.control_frame

    def on_frames(conn: lg.LiteConn, data: bytes, spans: lg.Spans, now: int) -> None:
        fd = conn.fd
        expect_id = want_id.get(fd)
        expect_owner = want_owner.get(fd)
        for b0, start, end in spans:
            if b0 & 0x0F != 1:
                if not control_frame(conn, b0, data, start, end):
                    return
                continue
            j = data.rfind(SENT_KEY, start, end)
            k = data.rfind(PAYLOAD_KEY, start, j) if j > 0 else -1
            if k > 0:
                counters["changes"] += 1
                step = int(data[k + 11 : data.index(b"|", k + 11, j)])
                lat = (now - int(data[j + 10 : data.index(b"}", j, end)])) // 1000
                r = data.find(ID_KEY, start, k)
                row_id = int(data[r + 15 : data.index(b",", r, k)]) if r >= 0 else -1
                st = stats.get(step)
                if st is None:
                    st = stats[step] = new_stats(now)
                if row_id >= 0:  # markers have negative ids
                    if row_id <= last_id[fd]:
                        st[5] += 1
                    else:
                        last_id[fd] = row_id
                if expect_id is not None:
                    f = data.find(filter_key, r if r >= 0 else start, k)
                    e = data.find(b",", f, k) if f >= 0 else -1
                    if e < 0 or int(data[f + len(filter_key) : e]) != expect_id:
                        counters["misrouted"] += 1
                if expect_owner is not None:
                    r = data.find(OWNER_KEY, start, end)
                    if r < 0 or not data.startswith(expect_owner, r + len(OWNER_KEY)):
                        counters["leaked"] += 1
                st[0] += 1
                st[2] = now
                st[3][bucket(lat)] += 1
                if lat > st[4]:
                    st[4] = lat
            else:
                counters["other"] += 1

    def on_control(line: bytes) -> bool:
        return lg.answer_control(line, stats, counters, pool.close_reasons, len(pool.by_fd), count_key="changes")

    pool.run(on_frames, on_control)


# --- writer ----------------------------------------------------------------------


def record_latency(hist: list[int], elapsed_ns: int) -> None:
    hist[bucket(elapsed_ns // 1000)] += 1


class Writer:
    """Inserts ``bench_rows`` in batched statements; ids cycle over ``[id_base, id_base + id_space)``.

    Each wrap of the cycle (and the start of a run with ``truncate_first``) empties the
    table with TRUNCATE in the same transaction, so every id is inserted once per cycle.
    With ``users``, the table has a ``user_id uuid`` column set to ``owner_uuid(seed, id % count)``;
    with ``k_mod``, a ``k int`` column set to ``id % k_mod``.
    """

    def __init__(self, dsn: str, payload_pad: int, table: str = TABLE, users: dict[str, Any] | None = None,
                 k_mod: int = 0) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True, application_name="realtime bench writer")
        self.pad = "x" * payload_pad
        self.backend_pid = int(self.conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        from psycopg import sql

        self.table = table
        self.by_k_mod: dict[int, Any] = {}
        if users:
            self.insert_sql = sql.SQL(
                "INSERT INTO {} (id, user_id, payload, sent_ns) SELECT g, "
                "CASE WHEN g >= 0 THEN md5({} || ':' || mod(g, {})::text)::uuid END, %s, %s "
                "FROM generate_series(%s::bigint, %s::bigint) g"
            ).format(sql.Identifier(table), sql.Literal(str(users["seed"])), sql.Literal(int(users["count"])))
        elif k_mod:
            self.insert_sql = self.k_insert(k_mod)
        else:
            self.insert_sql = sql.SQL(
                "INSERT INTO {} (id, payload, sent_ns) SELECT g, %s, %s FROM generate_series(%s::bigint, %s::bigint) g"
            ).format(sql.Identifier(table))
        self.truncate_sql = sql.SQL("TRUNCATE {}").format(sql.Identifier(table))

    def k_insert(self, k_mod: int) -> Any:
        """The insert that sets ``k`` to ``id % k_mod`` (one statement text per modulus)."""
        from psycopg import sql

        if k_mod not in self.by_k_mod:
            self.by_k_mod[k_mod] = sql.SQL(
                "INSERT INTO {} (id, k, payload, sent_ns) SELECT g, mod(g, {}), %s, %s "
                "FROM generate_series(%s::bigint, %s::bigint) g"
            ).format(sql.Identifier(self.table), sql.Literal(int(k_mod)))
        return self.by_k_mod[k_mod]

    def segments(self, pos: int, k: int, base: int, space: int, truncate_first: bool) -> list[tuple[bool, int, int]]:
        out = []
        while k > 0:
            off = pos % space
            n = min(k, space - off)
            out.append((off == 0 and (pos > 0 or truncate_first), base + off, base + off + n - 1))
            pos += n
            k -= n
        return out

    def insert(self, step: int, segments: list[tuple[bool, int, int]], statement: Any = None) -> tuple[int, int]:
        payload = f"{step}|{self.pad}"
        statement = statement or self.insert_sql
        if len(segments) == 1 and not segments[0][0]:
            _, lo, hi = segments[0]
            sent_ns = time.time_ns()
            self.conn.execute(statement, (payload, sent_ns, lo, hi))
            return sent_ns, time.time_ns()
        sent_ns = time.time_ns()
        with self.conn.transaction():
            for truncate, lo, hi in segments:
                if truncate:
                    self.conn.execute(self.truncate_sql)
                self.conn.execute(statement, (payload, sent_ns, lo, hi))
        return sent_ns, time.time_ns()

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        step = int(msg["step"])
        rate = float(msg.get("rate") or 0)
        duration = float(msg.get("duration") or 0)
        rows_limit = int(msg.get("rows") or 0)
        base, space = int(msg["id_base"]), int(msg["id_space"])
        truncate_first = bool(msg.get("truncate_first"))
        tick = float(msg.get("tick_ms", 5)) / 1000
        max_batch = int(msg.get("max_batch", 500))
        statement = self.k_insert(int(msg["k_mod"])) if msg.get("k_mod") else self.insert_sql
        total = round(rate * duration) if rate else (rows_limit or 1 << 62)
        hist = [0] * NBUCKETS
        commits = 0
        sent = 0
        pos = 0
        first_ns = last_ns = 0
        last_start = 0.0
        t0 = time.monotonic()
        end = t0 + duration if duration else float("inf")
        next_tick = t0
        while sent < total:
            now = time.monotonic()
            if rate:
                due = min(total, int((now - t0) * rate) + 1)
            else:
                if now >= end:
                    break
                due = total
            k = min(due - sent, max_batch)
            if k > 0:
                last_start = time.monotonic() - t0
                segs = self.segments(pos, k, base, space, truncate_first)
                sent_ns, done_ns = self.insert(step, segs, statement)
                if not first_ns:
                    first_ns = sent_ns
                last_ns = done_ns
                record_latency(hist, done_ns - sent_ns)
                commits += 1
                sent += k
                pos += k
            if rate and sent < total:
                next_tick = max(next_tick + tick, time.monotonic() - tick)
                delay = max(next_tick, t0 + sent / rate) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        wall = time.monotonic() - t0
        return {"sent": sent, "commits": commits, "wall": wall, "last_start_s": last_start, "rate": sent / wall if wall > 0 else 0.0,
                "first_ns": first_ns, "last_ns": last_ns,
                "commit_p50_ms": percentile_ms(hist, commits, 0.5), "commit_p99_ms": percentile_ms(hist, commits, 0.99),
                "rows_per_commit": sent / commits if commits else 0.0, "cpu": time.process_time()}

    def marker(self, marker_id: int) -> dict[str, Any]:
        """A committed row no subscriber counts; returns an LSN just before its commit record."""
        with self.conn.transaction():
            self.conn.execute(self.insert_sql, ("0|marker", time.time_ns(), marker_id, marker_id))
            lsn = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        return {"lsn": lsn}


def run_writer(cfg: dict[str, Any]) -> None:
    writer = Writer(cfg["dsn"], int(cfg.get("payload_pad", 16)), str(cfg.get("table") or TABLE), cfg.get("users"),
                    int(cfg.get("k_mod") or 0))
    lg.emit({"ready": True, "backend_pid": writer.backend_pid})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "run":
                lg.emit(writer.run(msg))
            elif cmd == "marker":
                lg.emit(writer.marker(int(msg["id"])))
            elif cmd == "sql":
                writer.conn.execute(msg["sql"])
                lg.emit({"ok": True})
            elif cmd == "quit":
                lg.emit({"bye": True})
                break
            else:
                lg.emit({"error": f"unknown command {cmd!r}"})
        except Exception as error:
            lg.emit({"error": f"{type(error).__name__}: {error}"[:500]})
    writer.conn.close()


def main(argv: list[str]) -> int:
    return lg.worker_main(argv, {"sub": run_sub_worker, "writer": run_writer})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
