"""dev.py test: when it installs Chromium for the browser test."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_dev_py_installs_the_browser_unless_only_unit_tests_run() -> None:
    import dev

    assert dev.only_unit_tests(["tests/unit"]) and dev.only_unit_tests(["-q", "tests/unit/test_servers.py::test_x"])
    for args in ([], ["tests"], ["-k", "broadcast"], ["tests/unit", "tests/e2e/test_admin_browser.py"]):
        assert not dev.only_unit_tests(args), args
