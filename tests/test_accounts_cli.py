"""``coordinator keys``: the command line an operator manages keys with, and a running
coordinator seeing its changes without a restart. Processes and a file: real time,
bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from .harness import MODEL, open_harness, poll

pytestmark = pytest.mark.slow  # processes, in real time


def _keys(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    env.pop("COORDINATOR_KEYS_DB", None)
    return subprocess.run([sys.executable, "-m", "coordinator", "keys", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_keys_add_list_show_revoke_and_their_errors(tmp_path: Path) -> None:
    added = _keys(tmp_path, "add", "team-a", "--rpm", "60", "--budget", "1000",
                  "--budget-window", "daily", "--models", "m1,m2", "--json")
    assert added.returncode == 0, added.stderr
    made = json.loads(added.stdout)
    assert made["secret"].startswith("sk-team-a-")
    assert made["limits"]["requests_per_minute"] == 60
    assert made["models"] == ["m1", "m2"]
    keys_file = tmp_path / "trio-inference-coordinator" / "keys.db"
    assert keys_file.stat().st_mode & 0o077 == 0  # for this user's eyes only
    assert made["secret"] not in keys_file.read_bytes().decode("latin-1")

    listed = _keys(tmp_path, "list")
    assert listed.returncode == 0 and listed.stdout.startswith("team-a  active")
    assert made["secret"] not in listed.stdout
    revoked = _keys(tmp_path, "revoke", "team-a", "--json")
    assert json.loads(revoked.stdout)["state"] == "revoked"
    assert json.loads(_keys(tmp_path, "show", "team-a", "--json").stdout)["state"] == "revoked"

    for args, status, said in [
        (("add", "team-a"), 1, "exists already"),
        (("show", "nobody"), 1, "no key named 'nobody'"),
        (("revoke", "nobody"), 1, "no key named 'nobody'"),
        (("add", "bad name"), 2, "a key's name is"),
        (("add", "x", "--rpm", "0"), 2, "requests_per_minute"),
        (("add", "x", "--budget-window", "weekly"), 2, "invalid choice"),
        (("--keys-db", "/proc/nowhere/keys.db", "list"), 2, "keys_db /proc/nowhere/keys.db"),
    ]:
        done = _keys(tmp_path, *args)
        assert done.returncode == status, (args, done.stderr)
        assert said in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, (
            args, done.stderr)


async def test_a_running_coordinator_sees_a_key_the_command_line_adds_and_revokes(
        tmp_path: Path) -> None:
    keys_db = str(tmp_path / "keys.db")

    def keys(*args: str) -> Any:
        done = _keys(tmp_path, "--keys-db", keys_db, *args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    with trio.fail_after(60):
        async with open_harness(keys_db=keys_db) as h:
            await h.add_provider("a")
            secret = (await trio.to_thread.run_sync(keys, "add", "live"))["secret"]
            accounts = h.coordinator.accounts
            await poll(lambda: accounts.authenticate(secret) is not None)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            answer = await h.request("/v1/chat/completions", body,
                                     headers={"authorization": f"Bearer {secret}"})
            assert answer.status == 200
            await trio.to_thread.run_sync(keys, "revoke", "live")
            revoked_at = trio.current_time()
            await poll(lambda: accounts.authenticate(secret) is None)
            assert trio.current_time() - revoked_at < 1.0
            refused = await h.request("/v1/chat/completions", body,
                                      headers={"authorization": f"Bearer {secret}"})
            assert refused.status == 401
