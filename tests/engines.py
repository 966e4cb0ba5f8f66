"""A real inference engine for tests: llama.cpp's server on a tiny model made at run time.

Each :class:`EngineProcess` runs ``provider-agent tiny-engine`` (provider_agent/tiny.py)
as a subprocess on a free loopback port, so a test can kill it like a crash. Tests
that need it are skipped, with the reason, only when llama.cpp's server (the
``xllamacpp`` wheel of the ``[engine]`` extra) is not installed; the nox slow session
installs it.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

HAVE_ENGINE = all(importlib.util.find_spec(m) is not None for m in ("xllamacpp", "gguf", "numpy"))
needs_engine = pytest.mark.skipif(
    not HAVE_ENGINE, reason="llama.cpp's server is not installed (pip install -c constraints.txt "
    "-e '.[engine]'; the nox slow session installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EngineProcess:
    """llama.cpp serving one tiny model in its own process."""

    def __init__(self, model: str, *, broken_template: bool = False, width: int = 64,
                 layers: int = 2, slots: int = 2) -> None:
        self.model, self.port = model, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "provider_agent", "tiny-engine", "--port", str(self.port),
                "--model-name", model, "--slots", str(slots), "--width", str(width),
                "--layers", str(layers)]
        if broken_template:
            args.append("--broken-template")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, "the engine exited while starting"
            time.sleep(0.05)
        raise AssertionError("the engine did not start within 120 s")

    def slots_busy(self) -> int:
        slots: list[dict[str, Any]] = httpx.get(self.url + "/slots", timeout=5).json()
        return sum(1 for s in slots if s.get("is_processing"))

    def tasks_run(self) -> int:
        """Slots that have processed a task since the engine started."""
        slots: list[dict[str, Any]] = httpx.get(self.url + "/slots", timeout=5).json()
        return sum(1 for s in slots if "id_task" in s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def engine_process(model: str, **kw: Any) -> Iterator[EngineProcess]:
    engine = EngineProcess(model, **kw)
    try:
        yield engine
    finally:
        engine.stop()
