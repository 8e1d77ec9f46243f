"""The replicator's loop: pages of the slot -> runs per table on the layer -> the slot consumed after.

``Listener.run`` runs for real on channels' ``InMemoryChannelLayer``; only the
slot's connection (``SlotReader``, the one psycopg edge) is replaced by a
script of pages holding captured pgoutput bytes (tests/fixtures/pgoutput).
The slot protocol itself is covered against PostgreSQL in tests/integration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.topics import table_group
from replication import listener as listener_module
from replication import pgoutput
from replication.connection import SlotRow
from replication.listener import Listener

pytestmark = pytest.mark.unit

CAPTURED = json.loads((Path(__file__).parents[1] / "fixtures" / "pgoutput" / "captured.json").read_text())
TYPE_NAMES = {int(oid): name for oid, name in CAPTURED["pg_type"].items()}
SCHEMA = "capture_fixture"  # of the captured tables


def rows(step: str) -> list[SlotRow]:
    [entry] = [s for s in CAPTURED["steps"] if s["name"] == step]
    return [SlotRow(0, int(m["xid"]), bytes.fromhex(m["hex"])) for m in entry["messages"]]


def commits(page: list[SlotRow]) -> list[int]:
    """End positions of the commits on a page, in order."""
    return [m.end_lsn for m in (pgoutput.decode_message(r.data) for r in page) if isinstance(m, pgoutput.Commit)]


class ScriptedSlot:
    """Stands in for ``SlotReader``: each peek yields the next scripted read, a page at a time.

    ``log`` is shared with the layer, so a test sees sends and advances in the order they happened.
    """

    def __init__(self, reads: list[list[list[SlotRow] | Exception]], log: list[tuple[str, Any]]) -> None:
        self.reads = reads
        self.log = log
        self.peeks = 0
        self.conn: ScriptedSlot | None = None
        self.closed = False
        self.looked_up: list[set[int]] = []

    async def connect(self) -> None:
        self.conn = self

    async def close(self) -> None:
        self.conn = None

    async def try_lock(self) -> bool:
        return True

    async def ensure_publication(self) -> None:
        return None

    async def ensure_slot(self) -> None:
        return None

    async def type_names(self) -> dict[int, str]:
        return TYPE_NAMES

    async def primary_keys(self, relation_oids: set[int]) -> dict[int, tuple[str, ...]]:
        self.looked_up.append(set(relation_oids))
        return {oid: ("id",) for oid in relation_oids}

    async def rls_relations(self, relation_oids: set[int]) -> frozenset[int]:
        return frozenset()

    async def wal_position(self) -> str:
        return f"0/{self.peeks}"  # moves on each peek, so an idle loop peeks again

    async def peek_pages(self, max_changes: int) -> AsyncGenerator[list[SlotRow], None]:
        self.peeks += 1
        pages = self.reads.pop(0) if self.reads else []
        for page in pages:
            if isinstance(page, Exception):
                raise page
            yield page

    async def advance(self, lsn: int) -> None:
        self.log.append(("advance", lsn))


class LoggedLayer(InMemoryChannelLayer):
    """channels' in-memory layer that notes each send in the shared log, and can be made to fail."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.log = log
        self.down = False
        self.sent_at: list[float] = []  # loop time of each send in the log

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if self.down:
            raise ConnectionError("Redis is down")
        self.log.append(("send", group, len(message.get("changes", ()))))
        self.sent_at.append(asyncio.get_running_loop().time())
        await super().group_send(group, message)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def drain(layer: InMemoryChannelLayer, channel: str) -> list[dict[str, Any]]:
    received = []
    while not layer.channels.get(channel, asyncio.Queue()).empty():
        received.append(await layer.receive(channel))
    return received


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, reads: list[list[list[SlotRow] | Exception]]) -> None:
        self.log: list[tuple[str, Any]] = []
        self.slot = ScriptedSlot(reads, self.log)
        self.layer = LoggedLayer(self.log)
        monkeypatch.setattr(listener_module, "SlotReader", lambda dsn, slot, publication: self.slot)
        self.listener = Listener("postgresql://unused", "slot", "publication", self.layer, poll_interval=0.001, streaming=False)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, *tables: str) -> str:
        channel = await self.layer.new_channel("hub.")
        for table in tables:
            await self.layer.group_add(table_group(SCHEMA, table), channel)
        return channel

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.listener.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> Any:
    made: list[Harness] = []

    def make(*reads: list[list[SlotRow] | Exception]) -> Harness:
        made.append(Harness(monkeypatch, list(reads)))
        return made[-1]

    yield make
    for h in made:
        if h.task is not None and not h.task.done():
            await h.finish()


async def test_one_read_goes_out_as_one_run_per_table_then_the_slot_is_consumed_once(harness) -> None:
    page = rows("identity_default")  # four transactions on one table
    h = harness([page])
    channel = await h.subscribe("identity_default")
    h.start()
    await until(lambda: ("advance", commits(page)[-1]) in h.log)
    await h.finish()
    assert h.log == [("send", table_group(SCHEMA, "identity_default"), 5), ("advance", commits(page)[-1])]
    [run] = await drain(h.layer, channel)
    assert [c["type"] for c in run["changes"]] == ["INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE"]
    assert run["primary_key"] == ["id"]
    stats = h.listener.stats
    assert (stats.transactions, stats.changes, stats.published_runs) == (4, 5, 1)


async def test_tables_get_their_own_runs_in_commit_order(harness) -> None:
    first, second = rows("insert_all_types"), rows("identity_default")
    h = harness([first + second])
    channel = await h.subscribe("all_types", "identity_default")
    h.start()
    await until(lambda: any(entry[0] == "advance" for entry in h.log))
    await h.finish()
    sent = [entry[1] for entry in h.log if entry[0] == "send"]
    assert sent == [table_group(SCHEMA, "all_types"), table_group(SCHEMA, "identity_default")]
    assert [m["table"] for m in await drain(h.layer, channel)] == ["all_types", "identity_default"]
    assert h.log[-1] == ("advance", commits(second)[-1])
    assert h.slot.looked_up and set().union(*h.slot.looked_up) == {
        m.oid for m in (pgoutput.decode_message(r.data) for r in first + second) if isinstance(m, pgoutput.Relation)
    }


async def test_a_transaction_over_several_pages_is_published_as_they_come_and_consumed_after_its_commit(harness) -> None:
    rows_ = rows("identity_default")
    # Page 1 ends inside the first transaction; page 2 ends inside the second.
    pages: list[list[SlotRow] | Exception] = [rows_[:3], rows_[3:7], rows_[7:]]
    h = harness(pages)
    await h.subscribe("identity_default")
    h.start()
    await until(lambda: any(entry[0] == "advance" for entry in h.log))
    await h.finish()
    group = table_group(SCHEMA, "identity_default")
    assert h.log == [("send", group, 1), ("send", group, 2), ("send", group, 2), ("advance", commits(rows_)[-1])]


async def test_a_read_that_fails_midway_consumes_only_the_transactions_published_whole(harness) -> None:
    rows_ = rows("identity_default")
    whole = rows_[:5]  # the first transaction, through its commit
    # The retry is a new decoding session: PostgreSQL describes the relation again before its first change.
    retry = [rows_[5], rows_[1], *rows_[6:]]
    h = harness([whole, rows_[5:7], ConnectionError("connection lost")], [retry])
    await h.subscribe("identity_default")
    h.start()
    await until(lambda: ("advance", commits(rows_)[-1]) in h.log)
    await h.finish()
    group = table_group(SCHEMA, "identity_default")
    advances = [entry for entry in h.log if entry[0] == "advance"]
    # The first read consumed up to the first commit only; the retry re-read the rest from there.
    assert advances == [("advance", commits(whole)[0]), ("advance", commits(rows_)[-1])]
    assert h.log[:3] == [("send", group, 2), ("send", group, 1), ("advance", commits(whole)[0])]
    assert "connection lost" in h.listener.stats.last_error


async def test_nothing_is_consumed_while_the_layer_is_down_and_publishing_waits_for_the_hubs_after(harness) -> None:
    page = rows("identity_default")
    h = harness([page], [page])  # the slot gives the same transactions again after the failure
    await h.subscribe("identity_default")
    h.layer.down = True
    h.listener.layer_recovery = 0.2
    h.start()
    await until(lambda: h.listener.stats.last_error.startswith("ConnectionError"))
    assert h.log == []  # not sent, not consumed
    h.layer.down = False
    await until(lambda: any(entry[0] == "advance" for entry in h.log))
    await h.finish()
    group = table_group(SCHEMA, "identity_default")
    # A probe first, then layer_recovery for the servers' hubs to rejoin their groups, then the run.
    assert h.log == [("send", "realtime.replicator-probe", 0), ("send", group, 5), ("advance", commits(page)[-1])]
    probe_at, run_at = h.layer.sent_at
    assert run_at - probe_at >= 0.2


async def test_a_read_with_no_complete_transaction_consumes_nothing(harness) -> None:
    rows_ = rows("identity_default")
    h = harness([rows_[:3]])  # begin, relation, insert: no commit yet
    await h.subscribe("identity_default")
    h.start()
    await until(lambda: h.slot.peeks >= 3)
    await h.finish()
    assert h.log == [("send", table_group(SCHEMA, "identity_default"), 1)]
