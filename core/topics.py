"""The only place channel-layer group names are made.

Layer group names allow ``[A-Za-z0-9._-]`` and fewer than 100 characters, while
Supabase sub-topics are free text; public and private channels with the same
sub-topic must stay apart (PROTOCOL.md 0 and 10). So a group name is a fixed
prefix, the privacy flag and a digest of the sub-topic.
"""

from __future__ import annotations

import hashlib
from typing import Final

TOPIC_PREFIX = "realtime:"

# Longest topic (``realtime:`` included), in UTF-8 bytes, that a join may name.
# The reference has no cap, but a topic is copied into every presence key name
# and entry, every log line and the admin's links, and the kind 4 frame that
# carries binary broadcasts holds at most 255 bytes of it (PROTOCOL.md 2.3).
# A join over the cap is refused with TOPIC_TOO_LONG (PascalCase code, message).
MAX_TOPIC_BYTES: Final = 1024
TOPIC_TOO_LONG: Final = ("TopicNameTooLong", f"Topic name must be at most {MAX_TOPIC_BYTES} bytes")


def topic_too_long(topic: str) -> bool:
    """Whether ``topic`` is over ``MAX_TOPIC_BYTES`` in UTF-8."""
    # Cheap for every ordinary topic: a character is at most 4 bytes.
    if len(topic) * 4 <= MAX_TOPIC_BYTES:
        return False
    return len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES


def sub_topic(topic: str) -> str:
    """``realtime:room1`` -> ``room1``."""
    return topic[len(TOPIC_PREFIX):] if topic.startswith(TOPIC_PREFIX) else topic


def _digest(sub_topic: str) -> str:
    return hashlib.blake2b(sub_topic.encode("utf-8"), digest_size=20).hexdigest()


def broadcast_group(sub_topic: str, private: bool) -> str:
    """The group that carries broadcasts for one (sub-topic, private) pair."""
    return f"rt.bc.{'priv' if private else 'pub'}.{_digest(sub_topic)}"


def presence_group(sub_topic: str, private: bool) -> str:
    """The group that carries presence diffs for one (sub-topic, private) pair.

    A public topic's diffs share its broadcast group (one membership per
    channel). On a private topic, reading broadcasts and reading presence are
    granted by separate policies (PROTOCOL.md 7), so its diffs have a group of
    their own that only members with presence read join.
    """
    if not private:
        return broadcast_group(sub_topic, private)
    return f"rt.pr.priv.{_digest(sub_topic)}"


def process_group(process_id: str) -> str:
    """The group of one server process (its presence ``process_id``): messages for its sockets by id."""
    return f"rt.proc.{process_id}"


def table_group(schema: str, table: str) -> str:
    """The group that carries one table's changes (one member per subscribed process)."""
    digest = hashlib.blake2b(f"{schema}\x00{table}".encode("utf-8"), digest_size=20).hexdigest()
    return f"rt.pg.{digest}"


def presence_channel(sub_topic: str, private: bool) -> str:
    """The presence store's name for one (sub-topic, private) pair."""
    return f"{'private' if private else 'public'}:{sub_topic}"


def parse_presence_channel(channel: str) -> tuple[str, bool]:
    """``presence_channel`` back to (sub-topic, private)."""
    side, _, name = channel.partition(":")
    return name, side == "private"
