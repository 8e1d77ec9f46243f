"""Presence metas, ``presence_state`` and ``presence_diff`` payloads (PROTOCOL.md 6.2).

Pure: no I/O, no clock, no Redis. A *meta* is the tracked payload plus a
``phx_ref`` that is unique per track; an ``Entry`` is one channel's meta with
the bookkeeping the store needs (owning socket and process, join time).

Shapes, as sent on the wire:

- state: ``{key: {"metas": [meta, ...]}}``, ``{}`` when nobody is tracked;
- diff: ``{"joins": state, "leaves": state}``, both always present.

An update is one diff: ``joins`` holds the new meta with ``phx_ref_prev`` set to
the old ``phx_ref``, ``leaves`` holds the old meta.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Meta = dict[str, Any]
Presences = dict[str, dict[str, list[Meta]]]
Diff = dict[str, Presences]

PHX_REF = "phx_ref"
PHX_REF_PREV = "phx_ref_prev"


@dataclass(frozen=True, slots=True)
class Entry:
    """One channel's tracked meta on one topic, as stored and listed."""

    channel: str
    key: str
    phx_ref: str
    meta: Meta  # the payload plus "phx_ref"
    socket_id: str
    process_id: str
    joined_at: float  # epoch seconds of the first track; kept across updates


def new_phx_ref() -> str:
    """A fresh opaque ``phx_ref``: base64url of 12 random bytes."""
    return secrets.token_urlsafe(12)


def make_meta(payload: Mapping[str, Any], phx_ref: str) -> Meta:
    """The meta for a tracked payload; ``phx_ref`` overrides a client-sent one."""
    meta = dict(payload)
    meta[PHX_REF] = phx_ref
    return meta


def presence_state(entries: Iterable[Entry]) -> Presences:
    """``presence_state`` payload: metas grouped by key, each key's metas in join order."""
    state: Presences = {}
    for entry in sorted(entries, key=lambda e: (e.joined_at, e.phx_ref)):
        state.setdefault(entry.key, {"metas": []})["metas"].append(dict(entry.meta))
    return state


def join_diff(key: str, meta: Meta) -> Diff:
    """``presence_diff`` for a first track."""
    return {"joins": {key: {"metas": [dict(meta)]}}, "leaves": {}}


def leave_diff(key: str, meta: Meta) -> Diff:
    """``presence_diff`` for an untrack or a channel that ended."""
    return {"joins": {}, "leaves": {key: {"metas": [dict(meta)]}}}


def update_diff(key: str, new_meta: Meta, old_meta: Meta) -> Diff:
    """``presence_diff`` for a re-track with a different payload."""
    joined = dict(new_meta)
    joined[PHX_REF_PREV] = old_meta[PHX_REF]
    return {"joins": {key: {"metas": [joined]}}, "leaves": {key: {"metas": [dict(old_meta)]}}}


def merge_diffs(*diffs: Diff) -> Diff:
    """One diff equivalent to applying ``diffs`` in order.

    Metas are concatenated per key. A ``phx_ref`` that both joins and leaves
    within the merged diffs was never seen by a receiver, so it is dropped
    from both sides; keys left without metas are dropped too.
    """
    joins: Presences = {}
    leaves: Presences = {}
    for diff in diffs:
        for side, merged in (("joins", joins), ("leaves", leaves)):
            for key, presence in diff.get(side, {}).items():
                merged.setdefault(key, {"metas": []})["metas"].extend(dict(m) for m in presence["metas"])
    joined_refs = {meta.get(PHX_REF) for presence in joins.values() for meta in presence["metas"]}
    left_refs = {meta.get(PHX_REF) for presence in leaves.values() for meta in presence["metas"]}
    transient = (joined_refs & left_refs) - {None}
    return {"joins": _without(joins, transient), "leaves": _without(leaves, transient)}


def is_empty(diff: Diff) -> bool:
    """Whether ``diff`` would change nothing for a receiver."""
    return not diff.get("joins") and not diff.get("leaves")


def _without(presences: Presences, refs: set[Any]) -> Presences:
    result: Presences = {}
    for key, presence in presences.items():
        metas = [meta for meta in presence["metas"] if meta.get(PHX_REF) not in refs]
        if metas:
            result[key] = {"metas": metas}
    return result
