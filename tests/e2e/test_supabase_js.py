"""Run each supabase-js end-to-end file (tests/e2e/js/*.test.mjs) against a live server.

One pytest test per file: ``node --test <file>`` with SUPABASE_URL, ANON_KEY,
SERVICE_KEY and JWT_SECRET in its environment, from tests/e2e/js. A session
replicator (``tests.fixtures.replicator``) streams the database to the same
Redis as the server; the files reach the database through ``PYTHON``
``tests/e2e/sql.py`` with ``PG_URL``. A failure shows node's output and the
tail of the server and replicator logs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.replicator import SHARED_ENV, ReplicatorProcess
from tests.fixtures.server import ServerProcess

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).resolve().parent / "js"
JS_FILES = sorted(JS_DIR.glob("*.test.mjs"))
NODE_TIMEOUT_S = 120
NPM_CI_TIMEOUT_S = 300
SUMMARY_LINE = re.compile(r"^\u2139 (tests|pass|fail) (\d+)$", re.MULTILINE)
SUPABASE_JS = JS_DIR / "node_modules" / "@supabase" / "supabase-js" / "package.json"


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


@pytest.mark.timeout(NODE_TIMEOUT_S + 60)
@pytest.mark.parametrize("js_file", JS_FILES, ids=[path.name for path in JS_FILES])
def test_supabase_js(
    js_file: Path,
    realtime_server: ServerProcess,
    replicator: ReplicatorProcess,
    anon_key: str,
    service_key: str,
    node_modules: Path,
) -> None:
    mismatched = [name for name in SHARED_ENV if realtime_server.env.get(name) != replicator.env.get(name)]
    assert not mismatched, f"server and replicator disagree on {mismatched}"
    env = {
        **os.environ,
        "SUPABASE_URL": realtime_server.url,
        "ANON_KEY": anon_key,
        "SERVICE_KEY": service_key,
        "JWT_SECRET": os.environ["JWT_SECRET"],
        "PG_URL": replicator.dsn,
        "PYTHON": sys.executable,
        "NO_COLOR": "1",
    }
    command = [_tool("node"), "--test", "--test-reporter=spec", js_file.name]
    try:
        result = subprocess.run(
            command,
            cwd=JS_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=NODE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(
            f"{' '.join(command)} did not finish within {NODE_TIMEOUT_S} s"
            " (a client left open keeps node alive)\n"
            f"{output}\n--- server log ---\n{realtime_server.log_tail()}"
            f"\n--- replicator log ---\n{replicator.log_tail()}"
        )
    print(result.stdout)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited with {result.returncode}\n{result.stdout}\n"
            f"--- server log ---\n{realtime_server.log_tail()}\n"
            f"--- replicator log ---\n{replicator.log_tail()}",
            pytrace=False,
        )
    counts = dict(SUMMARY_LINE.findall(result.stdout))
    assert int(counts.get("tests", "0")) > 0, f"{js_file.name} ran no test:\n{result.stdout}"
    assert counts.get("fail") == "0", f"node reported failures:\n{result.stdout}"
    realtime_server.check_alive()
    assert replicator.is_running(), replicator.describe("died during the run")
