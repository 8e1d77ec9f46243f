"""The embedded PostgreSQL: the binaries of the ``pgserver`` wheel, data in ``<checkout>/.local/pg``.

Starting is idempotent (a running server is found and reused), stale pid and
lock files left by a crash are cleared, and as root the server runs as an
unprivileged system account (PostgreSQL refuses root). The wheel is located
lazily, so importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devservices import checkout
from devservices.checkout import checkout_of
from devservices.errors import EmbeddedServiceError
from devservices.processes import HOST, log_tail, pid_alive, proc_cmdline, wait_until

PG_DIR = checkout.LOCAL_DIR / "pg"
PG_DATA = PG_DIR / "data"
PG_LOG = PG_DIR / "postgres.log"
PG_SOCKET_DIR = PG_DIR / "run"
PG_CONF_NAME = "realtime_embedded.conf"
PG_SUPERUSER = "postgres"
PG_DATABASE = "realtime"
PG_SYSTEM_USER = "realtime-pg"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

# Unix socket paths are limited to 108 bytes including the file name.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged system account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int


def postgres_url(port: int | None = None) -> str:
    return f"postgresql://{PG_SUPERUSER}@{HOST}:{port or checkout.pg_port()}/{PG_DATABASE}"


def running_port() -> int | None:
    """The port in the running (or last) postmaster's pid file, or None."""
    info = _read_postmaster_pid()
    return info[1] if info else None


def _is_postgres_process(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc exists) really a postgres."""
    if not pid_alive(pid):
        return False
    if not Path("/proc/self").exists():
        return True
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    cmdline = proc_cmdline(pid) or [""]
    return comm.startswith("postgres") or Path(cmdline[0]).name == "postgres"


def _pgserver_dir() -> Path:
    location = checkout.package_dir("pgserver")
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
    if len(str(candidate / f".s.PGSQL.{checkout.pg_port()}.lock")) <= _MAX_SOCKET_PATH:
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
                f"{Path(command[0]).name} timed out after {timeout:.0f}s.\n{log_tail(PG_LOG)}"
            ) from None
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
    if check and result.returncode != 0:
        raise EmbeddedServiceError(
            f"{' '.join(command)} failed with exit code {result.returncode}.\n"
            f"{(result.stdout + result.stderr).strip()}\n{log_tail(PG_LOG)}"
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
        argv = proc_cmdline(int(entry.name))
        if not argv or Path(argv[0]).name != "postgres":
            continue
        if any(argv[i] == "-D" and argv[i + 1] == target for i in range(len(argv) - 1)):
            found.append(int(entry.name))
    return found


def _terminate_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    if not wait_until(lambda: not any(pid_alive(pid) for pid in pids), STOP_TIMEOUT_S):
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
    lines = ["# Written by devservices/postgres.py on every start; edits are lost."]
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
                f"(pg_isready: {last}).\n{log_tail(PG_LOG)}"
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
        return checkout_of(_psql(port, "SHOW data_directory"), ".local/pg/data") + "'s PostgreSQL"
    except (EmbeddedServiceError, OSError, subprocess.SubprocessError):
        return "another program"


def ensure_postgres() -> str:
    """Start the embedded PostgreSQL unless it already runs; return its URL."""
    with checkout.service_lock():
        port = checkout.choose_port("postgres", "REALTIME_EMBEDDED_PG_PORT", checkout.DEFAULT_PG_PORT, _pg_ours, _pg_holder)
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


def stop_postgres() -> None:
    """Stop the embedded PostgreSQL (fast shutdown), if it runs; the caller holds ``checkout.service_lock``."""
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
