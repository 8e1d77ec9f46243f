"""What each role may read of a table now, re-checked as changes flow (PROTOCOL.md 4.4 step 2).

The reference checks a subscriber's column privileges with every change. Here
the hub asks, before delivering a run of changes, what each role among the
table's subscribers may SELECT; the answer is per role (not per subscriber or
claim set) and kept for ``REALTIME_PRIVILEGES_TTL_MS``, so a ``REVOKE`` on a
table or a column takes effect within that time plus one run, at the cost of
one catalog query per role and table and interval, whatever the traffic.
Grants are fetched when a channel subscribes and refreshed in the background
while changes flow, so delivery never waits on the database; a role whose
grants are not known is delivered nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Grants:
    """A table's columns, and those of them a role may SELECT."""

    columns: frozenset[str]
    readable: frozenset[str]

    @property
    def everything(self) -> bool:
        return self.readable == self.columns


NO_GRANTS = Grants(frozenset(), frozenset())  # nothing known: nothing readable

Fetch = Callable[[str, str, str], Awaitable[Grants]]  # (role, schema, table) -> grants


class PrivilegeCache:
    """Grants per (role, schema, table), fetched at most once per ``ttl`` seconds each."""

    def __init__(self, fetch: Fetch, ttl: float = 1.0) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._known: dict[tuple[str, str, str], tuple[Grants, float]] = {}
        self._pending: dict[tuple[str, str, str], asyncio.Future[Grants]] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def grants(self, role: str, schema: str, table: str, *, fresh: bool = False) -> Grants | None:
        """The role's grants now (within ``ttl``); the last known ones, or None, if the database fails."""
        key = (role, schema, table)
        known = self._known.get(key)
        now = time.monotonic()
        if known is not None and now - known[1] < self._ttl and not fresh:
            return known[0]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._fetch(role, schema, table))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            grants = await asyncio.shield(pending)
        except Exception:
            logger.warning("could not re-check what role %s may read of %s.%s", role, schema, table, exc_info=True)
            return known[0] if known is not None else None
        self._known[key] = (grants, time.monotonic())
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_forever())
        return grants

    def cached(self, role: str, schema: str, table: str) -> Grants | None:
        """What is known now, without waiting; a stale or missing entry is refreshed in the background.

        The hub's delivery loop calls this: it never waits on the database (a
        slow or exhausted pool must not hold up every delivery of the process).
        None means nothing is known yet: the caller delivers nothing to that role.
        """
        key = (role, schema, table)
        known = self._known.get(key)
        if (known is None or time.monotonic() - known[1] >= self._ttl) and key not in self._pending:
            task = asyncio.ensure_future(self.grants(role, schema, table))
            task.add_done_callback(_retrieve)
        return known[0] if known is not None else None

    async def _refresh_forever(self) -> None:
        """Ask again for every known entry each ``ttl``, so a REVOKE is seen without waiting for a change."""
        while self._known:
            await asyncio.sleep(self._ttl)
            for role, schema, table in list(self._known):
                await self.grants(role, schema, table, fresh=True)

    def close(self) -> None:
        """Stop refreshing and fetching (the hub is closing): nothing may open a pool after it closed."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        for pending in list(self._pending.values()):
            pending.cancel()
        self._known.clear()

    def forget(self, schema: str, table: str) -> None:
        """Drop what is known of a table (its last subscriber left)."""
        for key in [k for k in self._known if k[1:] == (schema, table)]:
            del self._known[key]


def _retrieve(task: asyncio.Future[Grants | None]) -> None:
    if not task.cancelled():
        task.exception()  # grants() logs its own failures; nothing is left unretrieved


async def fetch_grants(role: str, schema: str, table: str) -> Grants:
    """Grants from the database, through the server's pool (``realtime.authorization``)."""
    from realtime.authorization import get_database

    columns = await get_database().columns(schema, table, role)
    return Grants(frozenset(c.name for c in columns), frozenset(c.name for c in columns if c.readable))
