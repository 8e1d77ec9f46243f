"""Run ``manage.py`` with its PostgreSQL statements and round trips counted per connection (bench-only).

``python bench/_pgcount.py COUNTS_FILE manage.py replicate ...`` wraps psycopg's cursors in the child
process (the server's code is not touched), then runs ``manage.py`` as ``__main__``. A daemon thread
writes ``{application_name: {"statements": n, "round_trips": m, "as_subscriber": c}}`` to COUNTS_FILE every 0.1 s (and at
exit), so ``bench/rls.py`` can count the visibility queries of the replicator's check connection and
of the server's own fallback checks (``realtime.hub``'s ``row_check``), whatever RLS engine the
server runs.

A statement is one ``execute``/``executemany`` call (``executemany`` counts its parameter sets; a
multi-statement string such as ``BEGIN; ...; ROLLBACK`` is one). Outside pipeline mode every
statement is one round trip; inside ``conn.pipeline()`` the round trips are the pipeline's syncs
(``sync()`` and its exit). ``as_subscriber`` counts the statements whose text sets
``request.jwt.claims`` or call ``realtime.check_visibility``: the checks run as a subscriber
(visibility checks, join checks). Server-side work (a plpgsql loop) is invisible here by design: that is
what saves round trips.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

COUNTS: dict[str, list[int]] = {}
_LOCK = threading.Lock()


def _key(conn: Any) -> str:
    try:
        return str(conn.info.parameter_status("application_name") or "")
    except Exception:
        return "?"


def _as_subscriber(conn: Any, query: Any) -> bool:
    try:
        text = query if isinstance(query, (str, bytes)) else query.as_string(conn)
    except Exception:
        return False
    if isinstance(text, bytes):
        return b"request.jwt.claims" in text or b"realtime.check_visibility" in text
    return "request.jwt.claims" in text or "realtime.check_visibility" in text


def _count(conn: Any, statements: int, query: Any) -> None:
    pipelined = getattr(conn, "_bench_pipelines", 0) > 0
    checks = statements if _as_subscriber(conn, query) else 0
    with _LOCK:
        entry = COUNTS.setdefault(_key(conn), [0, 0, 0])
        entry[0] += statements
        if not pipelined:
            entry[1] += statements
        entry[2] += checks


def _round_trip(conn: Any) -> None:
    with _LOCK:
        COUNTS.setdefault(_key(conn), [0, 0, 0])[1] += 1


def install() -> None:
    import psycopg

    a_execute, a_executemany = psycopg.AsyncCursor.execute, psycopg.AsyncCursor.executemany
    s_execute, s_executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    async def async_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection, 1, query)
        return await a_execute(self, query, *args, **kwargs)

    async def async_executemany(self: Any, query: Any, params_seq: Any, *args: Any, **kwargs: Any) -> Any:
        params_seq = list(params_seq)
        _count(self.connection, len(params_seq), query)
        return await a_executemany(self, query, params_seq, *args, **kwargs)

    def sync_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection, 1, query)
        return s_execute(self, query, *args, **kwargs)

    def sync_executemany(self: Any, query: Any, params_seq: Any, *args: Any, **kwargs: Any) -> Any:
        params_seq = list(params_seq)
        _count(self.connection, len(params_seq), query)
        return s_executemany(self, query, params_seq, *args, **kwargs)

    a_pipeline, s_pipeline = psycopg.AsyncConnection.pipeline, psycopg.Connection.pipeline
    a_sync, s_sync = psycopg.AsyncPipeline.sync, psycopg.Pipeline.sync

    @contextlib.asynccontextmanager
    async def async_pipeline(self: Any) -> AsyncIterator[Any]:
        self._bench_pipelines = getattr(self, "_bench_pipelines", 0) + 1
        try:
            async with a_pipeline(self) as pipe:
                yield pipe
        finally:
            self._bench_pipelines -= 1
            _round_trip(self)

    @contextlib.contextmanager
    def sync_pipeline(self: Any) -> Iterator[Any]:
        self._bench_pipelines = getattr(self, "_bench_pipelines", 0) + 1
        try:
            with s_pipeline(self) as pipe:
                yield pipe
        finally:
            self._bench_pipelines -= 1
            _round_trip(self)

    async def async_sync(self: Any) -> None:
        _round_trip(self._conn)
        await a_sync(self)

    def sync_sync(self: Any) -> None:
        _round_trip(self._conn)
        s_sync(self)

    psycopg.AsyncCursor.execute = async_execute  # type: ignore[method-assign]
    psycopg.AsyncCursor.executemany = async_executemany  # type: ignore[method-assign]
    psycopg.Cursor.execute = sync_execute  # type: ignore[method-assign]
    psycopg.Cursor.executemany = sync_executemany  # type: ignore[method-assign]
    psycopg.AsyncConnection.pipeline = async_pipeline  # type: ignore[method-assign,assignment]
    psycopg.Connection.pipeline = sync_pipeline  # type: ignore[method-assign,assignment]
    psycopg.AsyncPipeline.sync = async_sync  # type: ignore[method-assign]
    psycopg.Pipeline.sync = sync_sync  # type: ignore[method-assign]


def dump(path: str) -> None:
    with _LOCK:
        data = {key: {"statements": s, "round_trips": r, "as_subscriber": c} for key, (s, r, c) in COUNTS.items()}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read(path: str) -> dict[str, dict[str, int]]:
    """The counts a wrapped process last wrote ({} before its first write)."""
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        print("usage: _pgcount.py COUNTS_FILE manage.py ARGS...", file=sys.stderr)
        sys.exit(2)
    path, script = argv[1], argv[2]
    install()

    def loop() -> None:
        event = threading.Event()
        while not event.wait(0.1):
            dump(path)

    dump(path)
    threading.Thread(target=loop, name="pgcount", daemon=True).start()
    atexit.register(dump, path)
    sys.argv = argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # the project, not bench/
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
