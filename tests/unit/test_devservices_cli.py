"""The commands that start and stop the development services: the new one and the old name still typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devservices import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_an_unknown_command_prints_the_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["restart"]) == 2
    assert capsys.readouterr().err.strip() == "usage: python -m devservices start|stop|status"


@pytest.mark.parametrize("module", ["devservices", "realtime_project.embedded"])
def test_both_module_names_run_the_cli(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"usage: python -m {module} start|stop|status"


def test_importing_the_package_and_its_cli_needs_only_the_standard_library() -> None:
    probe = "import sys, devservices, devservices.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
