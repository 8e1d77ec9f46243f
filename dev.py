#!/usr/bin/env python3
"""Development launcher: the single entry point for running and testing the server.

    python3 dev.py run [HOST:PORT]     serve on HOST:PORT (default 127.0.0.1:8000)
    python3 dev.py test [PYTEST ARGS]  mypy, lint-imports, then the test suite (default: all of tests/)
    python3 dev.py stop                stop the embedded PostgreSQL and Redis

This module owns the bootstrap (``.venv`` creation, ``pip install -r
requirements.txt`` when the file changed, ``npm ci`` for the Node end-to-end
suite), the development defaults (embedded PostgreSQL/Redis when
``DATABASE_URL``/``REDIS_URL`` are unset, a fixed development ``JWT_SECRET``)
and the supervision of the long-running processes of ``run``.

Only the standard library is imported before re-executing inside ``.venv``,
so a bare ``python3`` (3.11+) is enough on a fresh machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_STAMP = VENV / ".requirements.sha256"
MANAGE = ROOT / "manage.py"
REPLICATE_COMMAND = ROOT / "replication" / "management" / "commands" / "replicate.py"
E2E_JS = ROOT / "tests" / "e2e" / "js"
REEXEC_MARKER = "REALTIME_DEV_REEXEC"
STOP_GRACE_S = 10.0

USAGE = """usage:
  python3 dev.py run [HOST:PORT]                  start the server (default 127.0.0.1:8000)
  python3 dev.py test [--stop-services] [ARGS]    run pytest (default: tests/)
  python3 dev.py stop                             stop the embedded PostgreSQL and Redis"""


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def fail(message: str, code: int = 1) -> int:
    print(f"[dev] error: {message}", file=sys.stderr, flush=True)
    return code


# --------------------------------------------------------------------------
# Bootstrap: virtualenv, requirements, re-exec
# --------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def running_in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def ensure_venv() -> None:
    """Create .venv if needed and install requirements.txt when it changed."""
    python = venv_python()
    if not python.exists():
        say(f"creating virtualenv in {VENV.relative_to(ROOT)}/")
        base = getattr(sys, "_base_executable", sys.executable)
        result = subprocess.run([base, "-m", "venv", str(VENV)])
        if result.returncode != 0 or not python.exists():
            raise SystemExit(
                fail("could not create .venv (on Debian/Ubuntu install the python3-venv package)")
            )
        REQUIREMENTS_STAMP.unlink(missing_ok=True)
    digest = requirements_digest()
    try:
        installed = REQUIREMENTS_STAMP.read_text().strip()
    except OSError:
        installed = ""
    if installed == digest:
        return
    say("installing requirements.txt into .venv")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(fail("pip install -r requirements.txt failed", result.returncode))
    REQUIREMENTS_STAMP.write_text(digest + "\n")


def reexec_in_venv() -> None:
    """Replace this process with the same command run by .venv's Python."""
    if running_in_venv():
        return
    if os.environ.get(REEXEC_MARKER):
        raise SystemExit(fail(f"re-executing in {VENV} did not activate it (sys.prefix={sys.prefix})"))
    os.environ[REEXEC_MARKER] = "1"
    python = str(venv_python())
    os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]])


def bootstrap() -> None:
    if sys.version_info < (3, 11):
        raise SystemExit(fail(f"Python 3.11+ is required; this is {sys.version.split()[0]}"))
    ensure_venv()
    reexec_in_venv()
    os.environ.pop(REEXEC_MARKER, None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------
# Environment: services and development defaults
# --------------------------------------------------------------------------


def prepare_environment() -> None:
    """Start embedded services for unset URLs and default JWT_SECRET."""
    from devservices import checkout, services

    try:
        additions = services.ensure_services(os.environ)
    except services.EmbeddedServiceError as exc:
        raise SystemExit(fail(str(exc))) from None
    for name in ("DATABASE_URL", "REDIS_URL"):
        if name in additions:
            os.environ[name] = additions[name]
            say(f"{name}={additions[name]} (embedded; stop with: python3 dev.py stop)")
        else:
            say(f"{name} taken from the environment")
    if not os.environ.get("JWT_SECRET"):
        os.environ["JWT_SECRET"] = checkout.DEV_JWT_SECRET
        say(f"JWT_SECRET unset: using the development default {checkout.DEV_JWT_SECRET!r}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def manage(*args: str) -> list[str]:
    return [sys.executable, str(MANAGE), *args]


# --------------------------------------------------------------------------
# Child process supervision
# --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if dev.py dies without cleaning up (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def exit_status(returncode: int) -> int:
    """A child's return code as a shell exit status (killed by signal N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def supervise(commands: Sequence[tuple[str, list[str]]]) -> int:
    """Run the commands side by side; stop all when one exits or on SIGINT/SIGTERM.

    Children get their own process group so that a terminal Ctrl-C reaches
    them once, forwarded from here; a second Ctrl-C kills them.
    """
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for _, child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if len(received) > 1:
                        child.kill()
                    else:
                        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, argv in commands:
            if received:
                break
            say(f"starting {name}: {' '.join(argv[1:])}")
            children.append(
                (name, subprocess.Popen(argv, cwd=ROOT, process_group=0, preexec_fn=_die_with_parent))
            )
        first_exit: tuple[str, int] | None = None
        while first_exit is None and not received:
            for name, child in children:
                code = child.poll()
                if code is not None:
                    first_exit = (name, code)
                    break
            else:
                time.sleep(0.2)
        if first_exit is not None and len(children) > 1:
            say(f"{first_exit[0]} exited with code {first_exit[1]}; stopping the others")
        _stop_children(children, signalled=bool(received))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    assert first_exit is not None
    return exit_status(first_exit[1])


def _stop_children(children: Sequence[tuple[str, subprocess.Popen[bytes]]], *, signalled: bool) -> None:
    """Terminate the children still running (unless a signal was just forwarded), then wait."""
    if not signalled:
        for _, child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for name, child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {STOP_GRACE_S:.0f}s; killing it")
            child.kill()
            child.wait()


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def mint_key(role: str) -> str | None:
    """A JWT for ``role`` from ``manage.py mint_token``, or None when unavailable."""
    result = subprocess.run(manage("mint_token", "--role", role), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        if "Unknown command" not in result.stderr:
            say(f"mint_token --role {role} failed: {result.stderr.strip()}")
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else None


def display_url(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or host in {"0.0.0.0", "::", "[::]"}:
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def cmd_run(args: Sequence[str]) -> int:
    if len(args) > 1 or (args and args[0].startswith("-")):
        return fail(f"unexpected arguments {' '.join(args)!r}\n{USAGE}", 2)
    bootstrap()
    prepare_environment()
    from devservices import checkout, services

    # Without an address: 127.0.0.1:8000, or this checkout's own port when another checkout serves there.
    try:
        address = args[0] if args else f"127.0.0.1:{checkout.http_port()}"
    except services.EmbeddedServiceError as exc:
        return fail(str(exc))
    if not MANAGE.exists():
        return fail("manage.py is missing")
    migrate = subprocess.run(manage("migrate", "--noinput"), cwd=ROOT)
    if migrate.returncode != 0:
        return fail("manage.py migrate failed", migrate.returncode)

    keys = {role: mint_key(role) for role in ("anon", "service_role")}
    say(f"Realtime server: {display_url(address)}")
    for role, key in keys.items():
        say(f"{role} key: {key}" if key else f"{role} key: (manage.py mint_token is not available yet)")

    processes: list[tuple[str, list[str]]] = [("server", manage("runserver", address, "--noreload"))]
    if REPLICATE_COMMAND.exists():
        processes.append(("replicator", manage("replicate")))
    return supervise(processes)


def npm_ci_if_needed() -> None:
    lock = E2E_JS / "package-lock.json"
    if not lock.exists():
        return
    modules = E2E_JS / "node_modules"
    if modules.is_dir() and modules.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(fail("npm (Node 20+) is required for the end-to-end tests in tests/e2e/js"))
    say("installing the Node end-to-end dependencies (npm ci)")
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=E2E_JS)
    if result.returncode != 0:
        raise SystemExit(fail("npm ci failed in tests/e2e/js", result.returncode))
    os.utime(modules)


# The admin's browser test (tests/browser) drives these Debian packages; dev.py test installs them when missing.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_PACKAGES = ("chromium", "chromium-driver")


def only_unit_tests(pytest_args: Sequence[str]) -> bool:
    """Whether the run names paths and all of them are under tests/unit (no browser needed then)."""
    paths = [arg for arg in pytest_args if not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()]
    return bool(paths) and all(Path(path).resolve().is_relative_to(ROOT / "tests" / "unit") for path in paths)


def chromium_if_needed(pytest_args: Sequence[str]) -> None:
    """apt-get install chromium and chromium-driver when either is missing.

    A failed install does not stop the run: the browser test then fails
    (never skips), naming the missing binary.
    """
    if (CHROMIUM.exists() and CHROMEDRIVER.exists()) or only_unit_tests(pytest_args):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        say(f"{CHROMIUM} or {CHROMEDRIVER} is missing and there is no apt-get: the browser test will fail")
        return
    say(f"installing {' '.join(BROWSER_PACKAGES)} for the browser test (apt-get)")
    install = [apt, "install", "-y", "--no-install-recommends", *BROWSER_PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, stdin=subprocess.DEVNULL).returncode != 0:
        # The package lists may be missing or stale on a fresh machine.
        subprocess.run([apt, "update"], env=env, stdin=subprocess.DEVNULL)
        if subprocess.run(install, env=env, stdin=subprocess.DEVNULL).returncode != 0:
            say("apt-get install chromium chromium-driver failed: the browser test will fail")


def run_mypy() -> int:
    """mypy as pyproject.toml configures it (strict, its packages); 0 when they type-check."""
    say("mypy (strict; see [tool.mypy] in pyproject.toml)")
    return subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT).returncode


def run_import_linter() -> int:
    """lint-imports with the contracts of [tool.importlinter] in pyproject.toml; 0 when all are kept."""
    say("lint-imports (import contracts; see [tool.importlinter] in pyproject.toml)")
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT).returncode


def cmd_test(args: Sequence[str]) -> int:
    stop_after = "--stop-services" in args
    pytest_args = [arg for arg in args if arg != "--stop-services"] or ["tests"]
    bootstrap()
    typed = run_mypy()
    if typed != 0:
        return fail("mypy found type errors; pytest was not run", typed)
    layered = run_import_linter()
    if layered != 0:
        return fail("lint-imports found a broken import contract; pytest was not run", layered)
    npm_ci_if_needed()
    chromium_if_needed(pytest_args)
    # The services and test defaults come from the pytest plugin tests.fixtures.services,
    # which starts the embedded servers only when a test that is not marked unit runs.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    # pytest handles Ctrl-C itself (same process group); SIGTERM is forwarded.
    child = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT)

    def forward_term(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, forward_term)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)

    if stop_after:
        stop_services()
    code = exit_status(code)
    if code == 5:
        return fail("pytest collected no tests (exit code 5); treating that as a failure")
    return code


def stop_services() -> int:
    from devservices import services

    try:
        services.stop_services()
    except services.EmbeddedServiceError as exc:
        return fail(str(exc))
    say("embedded PostgreSQL and Redis stopped")
    return 0


def cmd_stop(args: Sequence[str]) -> int:
    if args:
        return fail(f"unexpected arguments {' '.join(args)!r}\n{USAGE}", 2)
    if venv_python().exists():
        reexec_in_venv()
    os.environ.pop(REEXEC_MARKER, None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return stop_services()


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "test":
        return cmd_test(rest)
    if command == "stop":
        return cmd_stop(rest)
    return fail(f"unknown command {command!r}\n{USAGE}", 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
