"""System checks of realtime settings (``realtime.checks``)."""

from __future__ import annotations

import pytest

from realtime.checks import check_settings

pytestmark = pytest.mark.unit


def test_a_check_timeout_under_one_millisecond_is_refused(settings) -> None:
    # statement_timeout 0 means none: one slow policy would hold up every table's changes.
    settings.REALTIME_CHECK_TIMEOUT_MS = 0
    assert "realtime.E004" in [message.id for message in check_settings()]
    settings.REALTIME_CHECK_TIMEOUT_MS = 5000
    assert "realtime.E004" not in [message.id for message in check_settings()]
