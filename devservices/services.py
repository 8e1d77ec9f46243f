"""What ``dev.py`` and the tests call: start the services a configuration lacks, stop them, report them."""

from __future__ import annotations

from collections.abc import Mapping

from devservices import checkout, postgres, redis
from devservices.errors import EmbeddedServiceError

__all__ = ["EmbeddedServiceError", "ensure_services", "status", "stop_services"]


def ensure_services(environ: Mapping[str, str]) -> dict[str, str]:
    """Start the embedded server for each of DATABASE_URL / REDIS_URL unset in ``environ``.

    Returns the variables to add to the environment (empty when both are set).
    """
    additions: dict[str, str] = {}
    if not environ.get("DATABASE_URL"):
        additions["DATABASE_URL"] = postgres.ensure_postgres()
    if not environ.get("REDIS_URL"):
        additions["REDIS_URL"] = redis.ensure_redis()
    return additions


def stop_services() -> None:
    """Stop the embedded PostgreSQL (fast shutdown) and Redis (no save), if running."""
    with checkout.service_lock():
        errors: list[str] = []
        for stop in (postgres.stop_postgres, redis.stop_redis):
            try:
                stop()
            except EmbeddedServiceError as exc:
                errors.append(str(exc))
        if errors:
            raise EmbeddedServiceError("\n".join(errors))


def status() -> dict[str, str]:
    """A human-readable state per service."""
    pg = postgres.postgres_pid()
    rd = redis.redis_pid()
    return {
        "postgres": f"running (pid {pg}) at {postgres.postgres_url(postgres.running_port())}" if pg else "stopped",
        "redis": f"running (pid {rd}) at {redis.redis_url()}" if rd else "stopped",
    }
