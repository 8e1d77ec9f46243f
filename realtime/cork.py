"""Corking: coalesce the frames written to each socket during one delivery.

Inside ``corked()`` a transport that supports it (daphne with
``realtime.server``) holds each connection's frames and writes them with one
system call when the block ends, so a run of changes costs one ``send()`` per
socket instead of one per change. Other servers never hold anything, so the
block is a no-op for them. Kept free of Twisted imports so the hub can use it
under any server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Writer(Protocol):
    def _write_now(self, data: bytes) -> None: ...


_held: dict[Writer, list[bytes]] | None = None


def hold(writer: Writer, frame: bytes) -> bool:
    """Keep ``frame`` for ``writer`` if a cork is in place; False means write it now."""
    if _held is None:
        return False
    _held.setdefault(writer, []).append(frame)
    return True


def release(writer: Writer) -> bytes:
    """Take what is held for ``writer`` (to write it before something that cannot wait)."""
    if _held is None:
        return b""
    return b"".join(_held.pop(writer, ()))


@contextmanager
def corked() -> Iterator[None]:
    """Hold direct writes until the block ends (a nested block joins the outer one)."""
    global _held
    if _held is not None:
        yield
        return
    _held = {}
    try:
        yield
    finally:
        pending, _held = _held, None
        for writer, frames in pending.items():
            writer._write_now(frames[0] if len(frames) == 1 else b"".join(frames))
