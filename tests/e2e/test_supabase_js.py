"""Run each supabase-js end-to-end file (tests/e2e/js/*.test.mjs) against a live server.

One pytest test per file under the session's daphne server (the files
running side by side, ``node_runs``), and the files of
``UVICORN_FILES`` (connect and refusal) again under each uvicorn ``--ws`` kind
the README names (``websockets``, and ``websockets-sansio`` whose refusals
Node could not parse); the rest runs under daphne only, to keep the suite
short. Each run is ``node --test <file>`` with SUPABASE_URL, ANON_KEY,
SERVICE_KEY and JWT_SECRET in its environment, from tests/e2e/js. A session
replicator (``tests.fixtures.replicator``) streams the database to the same
Redis as the server; the files reach the database through ``PYTHON``
``tests/e2e/sql.py`` with ``PG_URL``. A failure shows node's output and the
tail of the server and replicator logs.

A skipped or todo node test fails its file unless ``ALLOWED_SKIPS`` names it
with a reason (printed with the output): node itself exits 0 and counts
neither as a failure, so a test that skips instead of checking would pass
silently. ``js/results_reporter.mjs`` reports each test's directives.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.replicator import SHARED_ENV, ReplicatorProcess
from tests.fixtures.server import ServerKind, ServerProcess, serving

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).resolve().parent / "js"
JS_FILES = sorted(JS_DIR.glob("*.test.mjs"))
NODE_TIMEOUT_S = 120
# The daphne files run side by side; each mostly waits on the server.
NODE_CONCURRENCY = 4
# Started first so that the run ends soon after them.
SLOWEST_FIRST = ("postgres_changes.test.mjs", "auth.test.mjs", "private.test.mjs", "connect.test.mjs")
NPM_CI_TIMEOUT_S = 300
SUMMARY_LINE = re.compile(r"^\u2139 (tests|pass|fail|cancelled|skipped|todo) (\d+)$", re.MULTILINE)
SUPABASE_JS = JS_DIR / "node_modules" / "@supabase" / "supabase-js" / "package.json"
RESULTS_REPORTER = JS_DIR / "results_reporter.mjs"

# (file, test name) -> why that test may skip (or be todo) without failing the run.
ALLOWED_SKIPS: dict[tuple[str, str], str] = {}
# What runs under uvicorn too: handshakes, refusals and joins (about 10 s per server).
UVICORN_KINDS: tuple[ServerKind, ...] = ("uvicorn", "uvicorn-sansio")
UVICORN_FILES = [JS_DIR / "connect.test.mjs"]


@dataclass(frozen=True)
class NodeRun:
    """What ``node --test`` printed (spec reporter), its exit code and one result per test and suite."""

    command: list[str]
    returncode: int
    output: str
    results: list[dict[str, Any]]


@functools.cache
def force_exit_flags() -> tuple[str, ...]:
    """``--test-force-exit`` where node has it (20.14+ and 22+).

    realtime-js 2.119's ``disconnect()`` starts a 10 s timer it never clears,
    so without it node waits 10 s after a file's last test for nothing.
    """
    found = re.match(r"v(\d+)\.(\d+)", subprocess.run([_tool("node"), "--version"], capture_output=True, text=True, check=True).stdout)
    assert found, "node --version printed no version"
    major, minor = int(found[1]), int(found[2])
    return ("--test-force-exit",) if (major, minor) >= (20, 14) else ()


def run_node(js_file: Path, env: dict[str, str], timeout: float = NODE_TIMEOUT_S) -> NodeRun:
    """``node --test`` on one file from its directory, with the spec and the results reporters.

    Raises:
        subprocess.TimeoutExpired: the file did not finish within ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="node-results-") as directory:
        results_path = Path(directory) / "results.jsonl"
        command = [
            _tool("node"),
            "--test",
            *force_exit_flags(),
            "--test-reporter=spec",
            "--test-reporter-destination=stdout",
            f"--test-reporter={RESULTS_REPORTER.as_uri()}",
            f"--test-reporter-destination={results_path}",
            js_file.name,
        ]
        result = subprocess.run(
            command,
            cwd=js_file.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        text = results_path.read_text(encoding="utf-8") if results_path.exists() else ""
    results = [json.loads(line) for line in text.splitlines() if line.strip()]
    return NodeRun(command, result.returncode, result.stdout, results)


def run_problems(run: NodeRun, file_name: str, allowed: dict[tuple[str, str], str]) -> tuple[list[str], list[str]]:
    """(what makes this run fail, the reasons of the skips it was allowed) beyond a non-zero exit code."""
    problems: list[str] = []
    excused: list[str] = []
    tests = [r for r in run.results if not r["suite"]]
    if not tests:
        problems.append("the results reporter saw no test")
    for r in run.results:
        if r["failed"]:
            problems.append(f"failed: {r['name']!r}" + (" (todo: node does not count it)" if r["todo"] else ""))
        directives = [
            f"{kind} ({reason})" if isinstance(reason, str) else kind
            for kind, reason in (("skip", r["skip"]), ("todo", r["todo"]))
            if reason is not None
        ]
        if not directives:
            continue
        reason = allowed.get((file_name, r["name"]))
        if reason is None:
            problems.append(f"{' and '.join(directives)} not in ALLOWED_SKIPS: {r['name']!r}")
        else:
            excused.append(f"allowed {' and '.join(directives)}: {r['name']!r}: {reason}")
    counts = {name: int(n) for name, n in SUMMARY_LINE.findall(run.output)}
    if counts.get("tests", 0) == 0:
        problems.append("node's summary counts no test")
    if counts.get("fail") != 0:
        problems.append(f"node's summary: fail {counts.get('fail')}")
    if counts.get("cancelled", 0) != 0:
        problems.append(f"node's summary: cancelled {counts['cancelled']}")
    # The summary and the reporter must agree, or the reporter missed something.
    for kind in ("skip", "todo"):
        summary = counts.get("skipped" if kind == "skip" else "todo")
        seen = sum(1 for r in tests if r[kind] is not None)
        if summary != seen:
            problems.append(f"node's summary counts {summary} {kind}, the results reporter {seen}")
    return problems, excused


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; the end-to-end suite needs Node.js 20+ and npm")
    return path


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/e2e/js/node_modules, installed with ``npm ci`` if it is missing."""
    if not SUPABASE_JS.exists():
        result = subprocess.run(
            [_tool("npm"), "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return JS_DIR / "node_modules"


def test_js_suite_is_not_empty() -> None:
    assert JS_FILES, f"no *.test.mjs files in {JS_DIR}"


@pytest.fixture(scope="module", params=UVICORN_KINDS)
def uvicorn_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """One uvicorn server per ``--ws`` kind of ``UVICORN_KINDS``, for this module."""
    with serving(request, request.param) as server:
        yield server


@pytest.fixture(scope="module")
def node_runs(
    realtime_server: ServerProcess,
    replicator: ReplicatorProcess,
    anon_key: str,
    service_key: str,
    node_modules: Path,
) -> Iterator[dict[Path, Future[NodeRun]]]:
    """Every file started at once under daphne, ``NODE_CONCURRENCY`` at a time, longest first.

    The files mostly wait on the server (quiet periods, backoffs), so running
    them side by side takes about as long as the longest file, not their sum.
    They share nothing but the server and the replicator: each makes its own
    topics and tables (``uniqueTopic``, unique table names).
    """
    env = node_env(realtime_server, replicator, anon_key, service_key)
    order = sorted(JS_FILES, key=lambda path: (path.name not in SLOWEST_FIRST, path.name))
    with ThreadPoolExecutor(max_workers=NODE_CONCURRENCY, thread_name_prefix="node") as pool:
        runs = {js_file: pool.submit(run_node, js_file, env) for js_file in order}
        yield runs
        for run in runs.values():
            run.cancel()


@pytest.mark.timeout(NODE_TIMEOUT_S * (1 + len(JS_FILES) // NODE_CONCURRENCY) + 60)
@pytest.mark.parametrize("js_file", JS_FILES, ids=[path.name for path in JS_FILES])
def test_supabase_js(
    js_file: Path, node_runs: dict[Path, Future[NodeRun]], realtime_server: ServerProcess, replicator: ReplicatorProcess
) -> None:
    check_node_run(js_file, node_runs[js_file].result, realtime_server, replicator)


def test_uvicorn_files_exist() -> None:
    missing = [path.name for path in UVICORN_FILES if path not in JS_FILES]
    assert not missing, f"UVICORN_FILES names files that are not in {JS_DIR}: {missing}"


@pytest.mark.timeout(NODE_TIMEOUT_S + 60)
@pytest.mark.parametrize("js_file", UVICORN_FILES, ids=[path.name for path in UVICORN_FILES])
def test_supabase_js_under_uvicorn(
    js_file: Path,
    uvicorn_server: ServerProcess,
    replicator: ReplicatorProcess,
    anon_key: str,
    service_key: str,
    node_modules: Path,
) -> None:
    env = node_env(uvicorn_server, replicator, anon_key, service_key)
    check_node_run(js_file, lambda: run_node(js_file, env), uvicorn_server, replicator)


def node_env(realtime_server: ServerProcess, replicator: ReplicatorProcess, anon_key: str, service_key: str) -> dict[str, str]:
    """The environment of a node file run against ``realtime_server``."""
    mismatched = [name for name in SHARED_ENV if realtime_server.env.get(name) != replicator.env.get(name)]
    assert not mismatched, f"server and replicator disagree on {mismatched}"
    return {
        **os.environ,
        "SUPABASE_URL": realtime_server.url,
        "ANON_KEY": anon_key,
        "SERVICE_KEY": service_key,
        "JWT_SECRET": os.environ["JWT_SECRET"],
        "PG_URL": replicator.dsn,
        "PYTHON": sys.executable,
        "NO_COLOR": "1",
    }


def check_node_run(
    js_file: Path, run_file: Callable[[], NodeRun], realtime_server: ServerProcess, replicator: ReplicatorProcess
) -> None:
    """The result of one node file's run (``run_file``); fails with the server's and replicator's logs."""
    try:
        run = run_file()
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(
            f"{' '.join(map(str, exc.cmd))} did not finish within {NODE_TIMEOUT_S} s"
            " (a client left open keeps node alive)\n"
            f"{output}\n--- server log ---\n{realtime_server.log_tail()}"
            f"\n--- replicator log ---\n{replicator.log_tail()}"
        )
    print(run.output)
    if run.returncode != 0:
        pytest.fail(
            f"{' '.join(run.command)} exited with {run.returncode}\n{run.output}\n"
            f"--- server log ---\n{realtime_server.log_tail()}\n"
            f"--- replicator log ---\n{replicator.log_tail()}",
            pytrace=False,
        )
    problems, excused = run_problems(run, js_file.name, ALLOWED_SKIPS)
    for line in excused:
        print(line)
    assert not problems, f"{js_file.name}:\n" + "\n".join(problems) + f"\n{run.output}"
    realtime_server.check_alive()
    assert replicator.is_running(), replicator.describe("died during the run")


CHECKED_FILE = """\
import { test } from 'node:test'
test('passes', () => {})
test('skipped by option', { skip: 'not today' }, () => {})
test('skips itself', (t) => { t.skip('no reason') })
test('todo that fails', { todo: 'later' }, () => { throw new Error('boom') })
test('todo that passes', { todo: true }, () => {})
"""


def test_skips_and_todos_fail_the_run_unless_allowed(tmp_path: Path) -> None:
    """The check itself: node exits 0 here, yet every skip and todo not allowed is a problem."""
    js_file = tmp_path / "checked.test.mjs"
    js_file.write_text(CHECKED_FILE, encoding="utf-8")
    run = run_node(js_file, {**os.environ, "NO_COLOR": "1"}, timeout=60)
    assert run.returncode == 0, run.output  # node does not fail on any of them
    problems, excused = run_problems(run, js_file.name, {})
    assert sorted(problems) == sorted([
        "skip (not today) not in ALLOWED_SKIPS: 'skipped by option'",
        "skip (no reason) not in ALLOWED_SKIPS: 'skips itself'",
        "failed: 'todo that fails' (todo: node does not count it)",
        "todo (later) not in ALLOWED_SKIPS: 'todo that fails'",
        "todo not in ALLOWED_SKIPS: 'todo that passes'",
    ]), problems
    assert excused == []
    allowed = {(js_file.name, name): "a reason" for name in ("skipped by option", "skips itself", "todo that passes")}
    problems, excused = run_problems(run, js_file.name, allowed)
    assert problems == [
        "failed: 'todo that fails' (todo: node does not count it)",
        "todo (later) not in ALLOWED_SKIPS: 'todo that fails'",
    ], problems
    assert len(excused) == 3 and all(line.endswith(": a reason") for line in excused)
