"""The bytes a Twisted TCP transport holds that the kernel has not taken: Twisted's private write buffer, read here only.

``FileDescriptor.write`` appends to ``_tempDataBuffer`` (and ``_tempDataLen``);
``doWrite`` moves that into ``dataBuffer`` and sends from ``offset``
(``twisted/internet/abstract.py``). Twisted's public side of this is the
producer/consumer API, which only says "past ``bufferSize``" (64 KiB, fixed)
by calling ``pauseProducing``; the unsent-bytes cap of ``realtime.server``
(``REALTIME_MAX_UNSENT_BYTES``) and its direct writes need the count itself and
whether anything waits at all. ``tests/unit/test_twisted_buffer.py`` fails if a
Twisted upgrade changes these attributes or what they mean.

Other transports (TLS) report nothing held: serve TLS from a proxy in front to have the cap.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def has_unsent(transport: Any) -> bool:
    """Whether a plain TCP transport holds any bytes not yet taken by the kernel (two attribute reads)."""
    if type(transport) is tcp.Server and (transport.dataBuffer or transport._tempDataBuffer):
        return True
    return False


def unsent_bytes(transport: Any) -> int:
    """How many bytes a plain TCP transport holds that the kernel has not taken; 0 for other transports."""
    if type(transport) is not tcp.Server:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
