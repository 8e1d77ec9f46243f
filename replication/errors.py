"""Errors raised by the replication package.

Exception tree::

    ReplicationError            base of every error this package raises on purpose
    └── DecodeError             bytes or text from the server that cannot be decoded:
        │                       a truncated or corrupt COPY message, pgoutput message
        │                       or LSN text
        └── UnknownRelationError  a change names a relation oid that no Relation
                                  message has announced on this stream

The pure modules (``stream``, ``pgoutput``) raise nothing else for bad input;
anything else escaping them is a bug. (An array literal that does not parse is
``pgtypes.values.DecodeError``.)
"""

from __future__ import annotations

__all__ = ["DecodeError", "ReplicationError", "UnknownRelationError"]


class ReplicationError(Exception):
    """Base class of the replication package's errors."""


class DecodeError(ReplicationError):
    """Input from the server (or an LSN given as text) that cannot be decoded."""


class UnknownRelationError(DecodeError):
    """A change refers to a relation oid that no Relation message has described."""

    def __init__(self, relation_oid: int) -> None:
        super().__init__(f"no Relation message received for relation oid {relation_oid}")
        self.relation_oid = relation_oid
