"""Which claim sets are subscribed to which tables, across every server process.

Row level security is checked once per distinct claim set (role and JWT
claims), not once per socket: subscribers with identical claims see the same
rows. Identity is exact: every claim counts, ``iat``, ``exp`` and
``session_id`` included, so two tokens of one user are two claim sets. There
is deliberately no option to group tokens by the claims policies read
(ignoring ``iat``/``exp``, say): a policy may read any claim (``auth.jwt()``),
and a grouped claim set would be checked with one member's claims on behalf
of the others, so a policy that reads ``exp`` or ``session_id`` would answer
for the wrong token. The per-batch cost of many claim sets is kept down by
checking them all in one database call instead (``shared.visibility``). The replicator runs those checks, so it must know every claim set
subscribed to a table on any server process. This registry keeps that in
Redis:

- ``{prefix}:rls:process:{pid}``: hash, ``schema \\x1f table \\x1f fingerprint`` -> claims JSON,
  one per server process (``Registration``), holding what its sockets use; the JSON says
  ``"filtered": true`` when every channel of that claim set on that table, in that process, has
  only filtered bindings there;
- ``{prefix}:rls:processes``: sorted set, process id -> liveness deadline (ms);
- ``{prefix}:rls:version``: bumped on every change, so a reader reloads only then.

A process heartbeats (deadline and hash) every ``ttl / 3`` seconds and
rewrites its hash if Redis lost it. Readers drop the entries of processes
whose deadline passed: a process that died stops costing checks within
``ttl``. A reader that finds nothing for a subscriber is not a leak: the
server process checks any claim set the replicator did not (``realtime.hub``).

Filtered claim sets are left to the server processes. A subscriber that
filters (``user_id=eq.<its uid>``, as a real app's do) receives only the
changes its filter matches, so checking every change of the run for it is
mostly wasted: at 1,000 users that each subscribe to their own rows, 999 of
1,000 checks answer rows nobody of that claim set would receive. The
directory therefore leaves out a claim set whose channels on a table are all
filtered, in every process that has it (``Directory.claim_sets``); the
server process that holds them routes each change first and checks only the
claim sets some change routes to (``realtime.hub``). A row is still never
delivered unchecked: what the replicator did not answer, the hub checks or
drops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.jwt import Claims

logger = logging.getLogger(__name__)

SEPARATOR = "\x1f"
Table = tuple[str, str]


def fingerprint(claims: Claims) -> str:
    """One short id per distinct (role, claims): equal claims share every check."""
    canonical = json.dumps([claims.role, claims.raw], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=12).hexdigest()


def encode_claims(claims: Claims, filtered: bool = False) -> str:
    value: dict[str, Any] = {"role": claims.role, "claims": claims.raw}
    if filtered:
        value["filtered"] = True
    return json.dumps(value, separators=(",", ":"), default=str)


def is_filtered(text: str | bytes) -> bool:
    """Whether a registry entry says all its channels filter (an unreadable entry: no)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("filtered") is True


def decode_claims(text: str | bytes) -> Claims:
    value = json.loads(text)
    raw = value["claims"] if isinstance(value.get("claims"), dict) else {}
    sub = raw.get("sub")
    exp = raw.get("exp")
    return Claims(
        role=str(value["role"]),
        exp=float(exp) if isinstance(exp, (int, float)) else float("inf"),
        sub=sub if isinstance(sub, str) else None,
        raw=raw,
    )


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    @property
    def processes(self) -> str:
        return f"{self.prefix}:rls:processes"

    @property
    def version(self) -> str:
        return f"{self.prefix}:rls:version"

    def process(self, process_id: str) -> str:
        return f"{self.prefix}:rls:process:{process_id}"


def _field(table: Table, claim_set: str) -> str:
    return SEPARATOR.join((table[0], table[1], claim_set))


class Registration:
    """One server process's claim sets per table, reference-counted by its channels."""

    def __init__(self, redis: Redis, prefix: str, process_id: str, ttl: float = 15.0) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.process_id = process_id
        self.ttl = ttl
        self._counts: dict[str, int] = {}  # field -> channels using it
        self._unfiltered: dict[str, int] = {}  # field -> those of them with an unfiltered binding there
        self._claims: dict[str, str] = {}  # field -> claims JSON
        self._heartbeat: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dirty = False  # Redis may hold entries this process no longer has

    async def add(self, tables: Iterable[Table], claims: Claims, filtered: Iterable[Table] = ()) -> str:
        """Count one more channel of ``claims`` on ``tables``; returns its claim set id.

        ``filtered``: the tables among ``tables`` on which all of the channel's
        bindings have a filter. Pass the same to ``remove``.

        Returns once Redis has the entry, so a replicator that reads the
        registry after this returns checks this claim set. If Redis cannot be
        written, the heartbeat writes it later; meanwhile the server process
        checks the claim set itself (``realtime.hub``).
        """
        claim_set = fingerprint(claims)
        only_filtered = set(filtered)
        new: dict[str, str] = {}
        for table in tables:
            field = _field(table, claim_set)
            count = self._counts.get(field, 0)
            self._counts[field] = count + 1
            unfiltered = self._unfiltered.get(field, 0) + (table not in only_filtered)
            self._unfiltered[field] = unfiltered
            value = encode_claims(claims, filtered=unfiltered == 0)
            if self._claims.get(field) != value:  # new, or the first unfiltered channel of it
                new[field] = self._claims[field] = value
        async with self._lock:  # also waits for another channel's write of the same entry
            if new:
                try:
                    await self._write(new)
                except Exception:
                    # An entry Redis has already (a claim set that became unfiltered) keeps the
                    # count the heartbeat compares, so the rewrite must be asked for.
                    self._dirty = True
                    logger.warning("could not register a claim set in Redis; retrying with the heartbeat", exc_info=True)
        self._ensure_heartbeat()
        return claim_set

    async def remove(self, tables: Iterable[Table], claim_set: str, filtered: Iterable[Table] = ()) -> None:
        """One channel of ``claim_set`` left ``tables`` (``filtered`` as it was given to ``add``)."""
        only_filtered = set(filtered)
        gone = []
        changed = []
        for table in tables:
            field = _field(table, claim_set)
            count = self._counts.get(field, 0)
            if count <= 1:
                self._counts.pop(field, None)
                self._unfiltered.pop(field, None)
                self._claims.pop(field, None)
                if count == 1:
                    gone.append(field)
            else:
                self._counts[field] = count - 1
                unfiltered = max(0, self._unfiltered.get(field, 0) - (table not in only_filtered))
                self._unfiltered[field] = unfiltered
                if unfiltered == 0 and field in self._claims and not is_filtered(self._claims[field]):
                    # Its last unfiltered channel left: the server processes check it from now on.
                    value = json.loads(self._claims[field])
                    value["filtered"] = True
                    self._claims[field] = json.dumps(value, separators=(",", ":"))
                    changed.append(field)
        if gone or changed:
            async with self._lock:
                gone = [field for field in gone if field not in self._counts]  # unless re-added meanwhile
                rewrite = {field: self._claims[field] for field in changed if field in self._claims}
                if not gone and not rewrite:
                    return
                pipe = self.redis.pipeline(transaction=True)
                if gone:
                    pipe.hdel(self.keys.process(self.process_id), *gone)
                if rewrite:
                    pipe.hset(self.keys.process(self.process_id), mapping=dict(rewrite.items()))
                pipe.incr(self.keys.version)
                try:
                    await pipe.execute()
                except Exception:
                    # Costs the replicator a useless check until the heartbeat rewrites the hash.
                    logger.warning("could not unregister a claim set in Redis", exc_info=True)
                    self._dirty = True

    async def _write(self, entries: dict[str, str]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.process(self.process_id), mapping=dict(entries.items()))
        pipe.zadd(self.keys.processes, {self.process_id: self._deadline()})
        pipe.incr(self.keys.version)
        await pipe.execute()

    def _deadline(self) -> int:
        return int((time.time() + self.ttl) * 1000)

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._heartbeat_forever())

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.heartbeat()
            except Exception:
                logger.warning("could not refresh this process's claim sets in Redis", exc_info=True)

    async def heartbeat(self) -> None:
        """Push the deadline out; rewrite the entries if Redis no longer has them (a restart)."""
        async with self._lock:
            key = self.keys.process(self.process_id)
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(self.keys.processes, {self.process_id: self._deadline()})
            pipe.hlen(key)
            _, stored = await pipe.execute()
            if self._dirty or (stored != len(self._claims) and self._claims):
                self._dirty = False
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(key)
                pipe.hset(key, mapping=dict(self._claims.items()))
                pipe.incr(self.keys.version)
                await pipe.execute()

    async def aclose(self) -> None:
        """Forget this process's entries (clean shutdown)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self._counts.clear()
        self._unfiltered.clear()
        self._claims.clear()
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.process(self.process_id))
        pipe.zrem(self.keys.processes, self.process_id)
        pipe.incr(self.keys.version)
        await pipe.execute()


class Directory:
    """The replicator's view of the registry: claim sets per table, reloaded when it changed."""

    def __init__(self, redis: Redis, prefix: str, max_age: float = 5.0) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.max_age = max_age
        self._version: Any = None
        self._loaded_at = float("-inf")
        self._tables: dict[Table, dict[str, Claims]] = {}
        self._filtered: dict[Table, dict[str, Claims]] = {}

    async def claim_sets(self, table: Table) -> dict[str, Claims]:
        """Claim set id -> claims, for every live process's channels on ``table``.

        Leaves out the claim sets whose channels on ``table`` all filter, in
        every process that has them: their server processes check those.
        """
        await self.refresh()
        return self._tables.get(table, {})

    async def filtered(self, table: Table) -> dict[str, Claims]:
        """The claim sets ``claim_sets`` leaves out."""
        await self.refresh()
        return self._filtered.get(table, {})

    async def refresh(self) -> None:
        version = await self.redis.get(self.keys.version)
        now = time.monotonic()
        if version == self._version and now - self._loaded_at < self.max_age:
            return
        self._tables, self._filtered = await self._load()
        self._version, self._loaded_at = version, now

    async def _load(self) -> tuple[dict[Table, dict[str, Claims]], dict[Table, dict[str, Claims]]]:
        """(table -> claim sets to check, table -> claim sets every process of which filters)."""
        now_ms = int(time.time() * 1000)
        dead = await self.redis.zrangebyscore(self.keys.processes, "-inf", now_ms - 1)
        if dead:
            pipe = self.redis.pipeline(transaction=True)
            for process_id in dead:
                pipe.delete(self.keys.process(_text(process_id)))
            pipe.zrem(self.keys.processes, *dead)
            pipe.incr(self.keys.version)
            await pipe.execute()
        live = await self.redis.zrangebyscore(self.keys.processes, now_ms, "+inf")
        tables: dict[Table, dict[str, Claims]] = {}
        filtered: dict[Table, dict[str, Claims]] = {}
        if not live:
            return tables, filtered
        pipe = self.redis.pipeline(transaction=False)
        for process_id in live:
            pipe.hgetall(self.keys.process(_text(process_id)))
        for entries in await pipe.execute():
            for field, value in entries.items():
                parts = _text(field).split(SEPARATOR)
                if len(parts) != 3:
                    continue
                schema, table, claim_set = parts
                sets = tables.setdefault((schema, table), {})
                left = filtered.setdefault((schema, table), {})
                if claim_set in sets:
                    continue
                try:
                    claims = decode_claims(value)
                except (ValueError, KeyError, TypeError):
                    logger.warning("ignoring an unreadable claim set entry %r", field)
                    continue
                if not is_filtered(value):
                    sets[claim_set] = claims  # one process with an unfiltered channel: the replicator checks it
                    left.pop(claim_set, None)
                else:
                    left[claim_set] = claims
        return tables, filtered


def _text(value: object) -> str:
    """A Redis reply string as text (redis-py types range replies as possibly scored pairs too)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a Redis string reply, got {type(value).__name__}")
