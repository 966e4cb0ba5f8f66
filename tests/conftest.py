from __future__ import annotations

import logging

import pytest

from .redis_server import redis_server  # noqa: F401 (a fixture for every test module)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")
