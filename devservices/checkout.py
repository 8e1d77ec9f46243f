"""This checkout's development state: ``.local/``, the start/stop lock, and the ports of its services.

Ports: ``REALTIME_EMBEDDED_PG_PORT`` and ``REALTIME_EMBEDDED_REDIS_PORT`` when
set; otherwise each checkout picks its ports on its first start and remembers
them in ``.local/ports.json``: the defaults (54329, 63799; ``dev.py run``'s
8000 likewise) when free, else a free port at an offset derived from the
checkout's path, so two checkouts on one machine each run their own services.
A remembered port that something else holds is an error naming that holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from devservices.errors import EmbeddedServiceError
from devservices.processes import port_in_use

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO_ROOT / ".local"
LOCK_FILE = LOCAL_DIR / "embedded.lock"
PORTS_FILE = LOCAL_DIR / "ports.json"
# A checkout whose default port is taken tries this many ports past it, from an offset of its own.
PORT_RANGE = 500

DEFAULT_PG_PORT = 54329
DEFAULT_REDIS_PORT = 63799
DEFAULT_HTTP_PORT = 8000

DEV_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def _port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        port = int(raw)
    except ValueError:
        raise EmbeddedServiceError(f"{name} must be a TCP port number; got {raw!r}.") from None
    if not 0 < port < 65536:
        raise EmbeddedServiceError(f"{name} must be between 1 and 65535; got {port}.")
    return port


def _remembered_ports() -> dict[str, int]:
    """The ports this checkout chose earlier (``.local/ports.json``), by service."""
    try:
        document = json.loads(PORTS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {name: port for name, port in document.items() if isinstance(port, int) and 0 < port < 65536}


def _remember_port(service: str, port: int) -> None:
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    ports = {**_remembered_ports(), service: port}
    PORTS_FILE.write_text(json.dumps(ports, indent=2, sort_keys=True) + "\n")


def pg_port() -> int:
    """The port the embedded PostgreSQL listens on (the environment's, this checkout's, or the default)."""
    return _port_from_env("REALTIME_EMBEDDED_PG_PORT", _remembered_ports().get("postgres", DEFAULT_PG_PORT))


def redis_port() -> int:
    """The port the embedded Redis listens on (the environment's, this checkout's, or the default)."""
    return _port_from_env("REALTIME_EMBEDDED_REDIS_PORT", _remembered_ports().get("redis", DEFAULT_REDIS_PORT))


def _checkout_offset() -> int:
    """A number in [1, PORT_RANGE) fixed for this checkout's path, so checkouts spread out."""
    digest = hashlib.sha256(str(REPO_ROOT).encode()).digest()
    return 1 + int.from_bytes(digest[:4], "big") % (PORT_RANGE - 1)


def choose_port(
    service: str,
    env_name: str,
    default: int,
    ours: Callable[[int], bool],
    holder: Callable[[int], str],
    hint: str = "Stop that (python3 dev.py stop in its checkout)",
) -> int:
    """The port for ``service``: from the environment, remembered, or chosen now and remembered.

    Raises:
        EmbeddedServiceError: the remembered port is held by something that is not ours.
    """
    if os.environ.get(env_name, "").strip():
        return _port_from_env(env_name, default)
    remembered = _remembered_ports().get(service)
    if remembered is not None:
        if port_in_use(remembered) and not ours(remembered):
            raise EmbeddedServiceError(
                f"Port {remembered}, which this checkout uses for its {service} (.local/ports.json), is taken "
                f"by {holder(remembered)}. {hint}, or delete {PORTS_FILE} to pick a free port."
            )
        return remembered
    port = default
    if port_in_use(default) and not ours(default):
        offset = _checkout_offset()
        candidates = [default + (offset + step) % PORT_RANGE for step in range(PORT_RANGE)]
        port = next((p for p in candidates if p != default and not port_in_use(p)), 0)
        if not port:
            raise EmbeddedServiceError(f"No free port for the embedded {service} in {default}-{default + PORT_RANGE}.")
        print(
            f"[embedded] port {default} is taken by {holder(default)}; this checkout's {service} uses "
            f"port {port} (remembered in {PORTS_FILE})",
            file=sys.stderr,
            flush=True,
        )
    _remember_port(service, port)
    return port


def checkout_of(path: str, inside: str) -> str:
    """``path`` (a service's data directory ``<checkout>/<inside>``) as "the checkout <checkout>"."""
    if path.rstrip("/").endswith(inside):
        return f"the checkout {path.rstrip('/')[: -len(inside)].rstrip('/')}"
    return f"a server with its data in {path}"


def http_port() -> int:
    """The port of ``dev.py run``'s server: 8000 unless taken, then one of this checkout's own."""
    with service_lock():
        return choose_port(
            "http", "REALTIME_DEV_HTTP_PORT", DEFAULT_HTTP_PORT, lambda port: False, lambda port: "another program",
            hint="Stop it, pass an address (python3 dev.py run 127.0.0.1:PORT)",
        )


@contextlib.contextmanager
def service_lock() -> Iterator[None]:
    """Serialise start/stop across processes (pytest workers, dev.py, CLI)."""
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def package_dir(name: str) -> Path | None:
    """Where package ``name`` is installed: importable, or else in this checkout's .venv.

    The fallback lets ``python3 -m devservices`` find the wheels from any
    interpreter once ``dev.py`` has populated .venv.
    """
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for candidate in sorted(REPO_ROOT.glob(f".venv/lib/python3*/site-packages/{name}")):
        if candidate.is_dir():
            return candidate
    return None
