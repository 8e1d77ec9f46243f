"""Each server process's own numbers, in Redis, for the admin's Realtime status page.

``GET /metrics`` sums the processes of one machine (prometheus-client's
multiprocess mode) and knows nothing of other machines. So that the admin can
show the numbers of every server process, wherever it runs, each process
writes a snapshot of its own metrics (``ServerStatus``) every ``BEAT_EVERY_S``
under ``server_key`` with a TTL of ``BEAT_TTL_S``, and adds its name to the
sorted set ``servers_key`` scored by the time it wrote. A process that stopped
or lost Redis drops out within the TTL; a process that stops cleanly removes
itself at once (``forget``). The readers prune names older than the TTL.

The snapshot is read from the process's own metric objects
(``shared.metrics.SERVER``): in multiprocess mode too, each process reads its
own values, never the sum. Counters count from the process's start.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

BEAT_EVERY_S = 2.0  # how often a server process writes its numbers
BEAT_TTL_S = 10  # how long they stay without being written again


def servers_key(prefix: str) -> str:
    """The sorted set of server process names, scored by the unix time each last wrote."""
    return f"{prefix}:servers"


def server_key(prefix: str, name: str) -> str:
    """The Redis key of one server process's snapshot."""
    return f"{prefix}:server:{name}"


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """A sample's name as the text exposition writes it: ``realtime_joins_total{status="ok"}``."""
    if not labels:
        return name
    inner = ",".join(f'{label}="{value}"' for label, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def read_numbers(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of ``registry`` as ``sample_key -> value``, without histogram buckets and creation times."""
    numbers: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            numbers[sample_key(sample.name, sample.labels)] = float(sample.value)
    return numbers


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What one server process says about itself."""

    name: str  # host:pid, unique among the processes sharing Redis
    host: str
    pid: int
    presence_process: str  # the process id its presence members carry (presence/admin.py shows it)
    started_at: float  # unix time the process started writing
    updated_at: float  # unix time it wrote this
    numbers: dict[str, float] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def number(self, key: str) -> float:
        return self.numbers.get(key, 0.0)


def decode_server(raw: bytes | str | None) -> ServerStatus | None:
    """A snapshot written by ``ServerStatus.encode``; None for a missing or unreadable value."""
    if raw is None:
        return None
    try:
        fields: dict[str, Any] = json.loads(raw)
        status = ServerStatus(**fields)
    except (ValueError, TypeError):
        return None
    if not isinstance(status.numbers, dict):
        return None
    return status


async def publish(redis: Any, prefix: str, status: ServerStatus) -> None:
    """Write ``status`` with its TTL and register its name (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(server_key(prefix, status.name), status.encode(), ex=BEAT_TTL_S)
        pipe.zadd(servers_key(prefix), {status.name: status.updated_at})
        await pipe.execute()


async def forget(redis: Any, prefix: str, name: str) -> None:
    """Remove a process that stops (its numbers leave the page at once)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(server_key(prefix, name))
        pipe.zrem(servers_key(prefix), name)
        await pipe.execute()


async def read_servers(redis: Any, prefix: str, now: float) -> list[ServerStatus]:
    """The snapshots of the processes that wrote within the TTL, by name; older names are pruned."""
    key = servers_key(prefix)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(key, "-inf", now - BEAT_TTL_S)
        pipe.zrange(key, 0, -1)
        _, members = await pipe.execute()
    names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    if not names:
        return []
    raws = await redis.mget([server_key(prefix, name) for name in names])
    found = (decode_server(raw) for raw in raws)
    return [status for status in found if status is not None]


def labels_seen(servers: Iterable[ServerStatus], name: str) -> list[str]:
    """The sample keys of metric ``name`` with labels that any of ``servers`` reported, sorted."""
    prefix = name + "{"
    return sorted({key for status in servers for key in status.numbers if key.startswith(prefix)})
