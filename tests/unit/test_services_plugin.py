"""tests.fixtures.services starts the embedded servers only for a test not marked unit.

The test runs pytest in a subprocess, configured by this repository's
pyproject.toml, on a small test module; a plugin loaded first replaces
``devservices.services.ensure_services`` with one that only records its calls, so no
server is started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

RECORDER = '''
import os

from devservices import services


def ensure_services(environ):
    with open(os.environ["SERVICES_RECORD"], "a") as record:
        record.write("started\\n")
    return {name: os.environ[name] for name in ("DATABASE_URL", "REDIS_URL") if not environ.get(name)}


services.ensure_services = ensure_services
'''

PROBE = '''
import os

import pytest


def started():
    path = os.environ["SERVICES_RECORD"]
    if not os.path.exists(path):
        return 0
    with open(path) as record:
        return record.read().count("started")


@pytest.mark.unit
def test_a_unit_test_runs_with_no_service_started():
    assert started() == 0
    assert os.environ["DATABASE_URL"].startswith("postgresql://")  # exported for Django, not started


def test_a_test_not_marked_unit_runs_with_the_services_started():
    assert started() == 1


def test_they_are_started_once_per_run():
    assert started() == 1
'''


def run_pytest(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    (tmp_path / "services_recorder.py").write_text(textwrap.dedent(RECORDER))
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(PROBE))
    record = tmp_path / "record"
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "PYTEST_ADDOPTS"}}
    env.update(SERVICES_RECORD=str(record), PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
         "-p", "services_recorder", "-p", "no:cacheprovider", "-q", str(tmp_path / "test_probe.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    starts = record.read_text().count("started") if record.exists() else 0
    return result, starts


def test_services_start_once_and_only_when_a_test_not_marked_unit_runs(tmp_path: Path) -> None:
    # One subprocess (about a second of pytest and Django start-up): the unit test runs first and sees nothing started.
    result, starts = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert starts == 1
