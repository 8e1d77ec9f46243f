"""The one error of the development services."""

from __future__ import annotations


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started, reached or stopped."""
