"""Each server process's snapshot for the admin's status page (``shared.servers``) and the page's table."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from realtime.admin_status import table
from shared import servers

pytestmark = pytest.mark.unit


def status(**numbers: float) -> servers.ServerStatus:
    return servers.ServerStatus(
        name="h:1", host="h", pid=1, presence_process="p", started_at=1.0, updated_at=2.0, numbers=numbers
    )


def test_read_numbers_keys_samples_as_the_exposition_does_without_buckets() -> None:
    registry = CollectorRegistry()
    Gauge("g", "g", registry=registry).set(3)
    Counter("c", "c", ["kind", "a"], registry=registry).labels("x", "y").inc(2)
    Histogram("h", "h", registry=registry, buckets=(1.0,)).observe(0.5)
    numbers = servers.read_numbers(registry)
    assert numbers["g"] == 3.0
    assert numbers['c_total{a="y",kind="x"}'] == 2.0
    assert (numbers["h_count"], numbers["h_sum"]) == (1.0, 0.5)
    assert not [key for key in numbers if key.endswith(("_bucket", "_created"))]


def test_a_snapshot_round_trips_and_garbage_decodes_to_none() -> None:
    original = status(realtime_sockets=4.0)
    assert servers.decode_server(original.encode()) == original
    for raw in (None, b"", b"[]", b"{}", b'{"name": 1}', b"not json", '{"name":"a","host":"h","pid":1,"presence_process":"p","started_at":1,"updated_at":2,"numbers":[]}'):
        assert servers.decode_server(raw) is None


def test_the_table_has_a_value_per_process_and_the_total() -> None:
    rows = table([
        status(realtime_sockets=2, realtime_join_seconds_count=2, realtime_join_seconds_sum=0.1,
               **{'realtime_limit_hits_total{kind="join_rate"}': 1}),
        status(realtime_sockets=1500, realtime_join_seconds_count=0, realtime_join_seconds_sum=0),
    ])
    by_key = {row.key: row for row in rows if row.key}
    assert (by_key["realtime_sockets"].values, by_key["realtime_sockets"].total) == (["2", "1,500"], "1,502")
    [mean] = [row for row in rows if row.label == "Mean join time (ms)"]
    assert (mean.values, mean.total) == (["50.0", "–"], "50.0")
    limit = by_key['realtime_limit_hits_total{kind="join_rate"}']
    assert (limit.label, limit.values, limit.total) == ("join_rate", ["1", "0"], "1")
    assert [row.label for row in rows if row.heading][-2:] == ["Limits reached", "Handshakes refused"]


def test_the_table_of_no_process_is_all_zero() -> None:
    rows = table([])
    assert all(row.total in ("0", "–", "") for row in rows)

