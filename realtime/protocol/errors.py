"""Errors raised by the protocol package.

Exception tree::

    ProtocolError          base; every error carries a PascalCase ``code`` and a ``message``
    └── FrameError         a frame that cannot be decoded (PROTOCOL.md 2.4: logged and
                           dropped, the socket stays open), or an unsupported ``vsn``
                           (code ``UnsupportedVsn``, PROTOCOL.md 1.1: no upgrade)

``str(error)`` is the message; the code is read from ``error.code``.
"""

from __future__ import annotations

__all__ = ["FrameError", "ProtocolError"]


class ProtocolError(Exception):
    """Base class of protocol errors; ``code`` is PascalCase, ``message`` plain text."""

    code: str = "ProtocolError"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class FrameError(ProtocolError):
    """A frame (or the ``vsn`` naming its format) that cannot be decoded."""

    code = "MalformedFrame"
