from __future__ import annotations

import logging
import os

import pytest

from .redis_server import redis_server  # noqa: F401 (a fixture for every test module)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")


@pytest.fixture(autouse=True, scope="session")
def _own_state_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Files a command keeps for its user (`coordinator serve`'s keys file, a simulated
    fleet's keys) go to this run's own directory, never the user's, in this process and
    in every process a test starts."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
