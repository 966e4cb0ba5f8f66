"""Scale-out, black-box: real coordinator processes, a real redis-server, simulated fleets.

Each test starts its own redis-server on a free loopback port and two or three
``coordinator serve`` processes sharing it, with providers split across them;
it then talks HTTP to the instances as a consumer would. Skipped, with the
reason, only when redis-server cannot be found (the nox session installs
Debian's redis-server when it can).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS = shutil.which("redis-server")
pytestmark = [
    pytest.mark.slow,  # processes and a redis-server, in real time (docs/testing.md)
    pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (the nox slow "
                       "session installs Debian's redis-server where it can: apt-get, as root)"),
]
KEY, TOKEN, CLUSTER = "k", "t", "cluster-secret"
CHAT = {"model": "sim-chat-small", "messages": [{"role": "user", "content": "hello"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``predicate`` (a cross-process condition) until it holds, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class Cluster:
    """Processes for one test: redis, instances, fleets; all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.instances: dict[str, dict[str, Any]] = {}
        self.start_redis()

    def start_redis(self) -> None:
        assert REDIS is not None
        self.redis = subprocess.Popen(
            [REDIS, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.redis_port), 0.2),
                   what="redis")

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(10)

    def instance(self, name: str, **env: str) -> dict[str, Any]:
        ports = {"http": free_port(), "provider": free_port(), "cluster": free_port()}
        environ = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
        environ.update({
            "COORDINATOR_API_KEYS": KEY, "COORDINATOR_ADMIN_KEYS": "admin",
            "COORDINATOR_PROVIDER_TOKENS": TOKEN,
            "COORDINATOR_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
            "COORDINATOR_INSTANCE_ID": name, "COORDINATOR_CLUSTER_TOKEN": CLUSTER,
            "COORDINATOR_HTTP_PORT": str(ports["http"]),
            "COORDINATOR_PROVIDER_PORT": str(ports["provider"]),
            "COORDINATOR_CLUSTER_PORT": str(ports["cluster"]),
            "COORDINATOR_CLUSTER_REFRESH": "0.2", "COORDINATOR_CLUSTER_TTL": "1.5",
            "COORDINATOR_SPECULATIVE_BACKUP": "false", **env})
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "coordinator", "serve"], cwd=ROOT,
                                env=environ, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        entry = {"proc": proc, "url": f"http://127.0.0.1:{ports['http']}",
                 "ws": f"ws://127.0.0.1:{ports['provider']}/", "log": self.tmp / f"{name}.log"}
        self.instances[name] = entry
        wait_until(lambda: httpx.get(entry["url"] + "/healthz").status_code == 200,
                   what=f"instance {name}")
        return entry

    def fleet(self, *names: str, spec: str, keys: str | None = None) -> subprocess.Popen[bytes]:
        """A fleet file's providers, connected to the instances ``names`` (in order), with
        keys of their own (or those in the key directory ``keys``, kept across runs)."""
        path = self.tmp / f"fleet-{len(self.procs)}.toml"
        path.write_text(f'token = "{TOKEN}"\n' + spec)
        urls = ",".join(self.instances[n]["ws"] for n in names)
        directory = self.tmp / (keys or f"keys-{len(self.procs)}")
        proc = subprocess.Popen([sys.executable, "-m", "provider_sim", "fleet", "--file",
                                 str(path), "--coordinator", urls, "--keys", str(directory)],
                                cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def health(self, name: str) -> dict[str, Any]:
        reply: dict[str, Any] = httpx.get(self.instances[name]["url"] + "/healthz").json()
        return reply

    def admin(self, name: str) -> dict[str, Any]:
        reply: dict[str, Any] = httpx.get(self.instances[name]["url"] + "/v1/admin/providers",
                                          headers={"authorization": "Bearer admin"}).json()
        return reply

    def sees(self, name: str, provider: str) -> bool:
        return any(p["id"] == provider for p in self.admin(name)["providers"])

    def chat(self, name: str, **extra: Any) -> httpx.Response:
        return httpx.post(self.instances[name]["url"] + "/v1/chat/completions",
                          json={**CHAT, **extra}, headers={"authorization": f"Bearer {KEY}"},
                          timeout=60)

    def kill(self, name: str) -> None:
        proc = self.instances[name]["proc"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None and self.redis.poll() is None:
            self.stop_redis()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
        for name, entry in c.instances.items():  # nothing hangs, no slot leaks
            if entry["proc"].poll() is None:
                wait_until(lambda n=name: c.admin(n)["leases"] == 0 and not any(  # type: ignore[misc]
                    p["slots"]["in_use"] for p in c.admin(n)["providers"]), timeout=10,
                    what=f"instance {name}'s slots all free")
    finally:
        c.close()
        for entry in c.instances.values():  # no instance may have logged a traceback
            assert b"Traceback" not in Path(entry["log"]).read_bytes(), entry["log"]


def provider(pid: str, *, behaviour: str = "healthy", decode_tps: float = 200.0,
             model: str = "sim-chat-small") -> str:
    return (f'[[provider]]\nid = "{pid}"\nbehaviour = "{behaviour}"\n'
            f"decode_tps = {decode_tps}\n[[provider.model]]\nid = \"{model}\"\n")


def test_any_instance_serves_a_provider_connected_to_another(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.instance(name)
    cluster.fleet("b", spec=provider("on-b"))
    wait_until(lambda: cluster.sees("a", "on-b") and cluster.sees("c", "on-b"),
               what="b's provider in a's and c's directory")
    for name in ("a", "c", "b"):
        reply = cluster.chat(name)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-provider-id"] == "on-b"
        assert reply.headers.get("x-provider-instance") == (None if name == "b" else "b")
        assert reply.json()["choices"][0]["message"]["content"].startswith("Hello from")
    streamed = cluster.chat("a", stream=True)
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert streamed_content(streamed.text).startswith("Hello from")


def streamed_content(text: str) -> str:
    """The content deltas of an SSE chat stream, joined."""
    parts = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def test_a_cooldown_entered_anywhere_is_seen_everywhere(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.instance(name, COORDINATOR_BREAKER_STRIKES="2")
    cluster.fleet("b", spec=provider("sick", behaviour="error:status=500"))
    wait_until(lambda: cluster.sees("a", "sick"), what="sick in a's directory")
    assert cluster.chat("a", provider_ids=["sick"]).status_code == 503  # strike one, via a
    assert cluster.chat("b", provider_ids=["sick"]).status_code == 503  # strike two, via b

    def cooling(name: str) -> bool:
        return any(p["cooldowns"] for p in cluster.admin(name)["providers"] if p["id"] == "sick")

    wait_until(lambda: cooling("a") and cooling("b"), timeout=5, what="the shared cooldown")
    refused = cluster.chat("a", provider_ids=["sick"])
    assert refused.status_code == 503 and "cooling down" in refused.json()["error"]["message"]
    cluster.instance("late")  # joined after the announcement: finds it on record
    wait_until(lambda: cooling("late"), timeout=5, what="the cooldown on record")


def test_an_instance_dying_before_content_is_an_invisible_failover(cluster: Cluster) -> None:
    cluster.instance("a")
    cluster.instance("b")
    cluster.fleet("a", spec=provider("local", decode_tps=10))
    # Faster on paper, so it is chosen first — and slow to start: b dies meanwhile.
    cluster.fleet("b", spec=provider("remote", decode_tps=5000,
                                     behaviour="healthy:first_token_delay=3"))
    wait_until(lambda: cluster.sees("a", "remote") and cluster.sees("a", "local"))
    with httpx.Client(timeout=60) as client:
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", client.post(
            cluster.instances["a"]["url"] + "/v1/chat/completions", json=CHAT,
            headers={"authorization": f"Bearer {KEY}"})))
        thread.start()
        wait_until(lambda: "remote" in json.dumps(cluster.admin("b")) and any(
            p["slots"]["in_use"] for p in cluster.admin("b")["providers"]), what="the relay")
        cluster.kill("b")
        thread.join(60)
    reply = result["r"]
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-provider-id"] == "local" and reply.headers["x-attempts"] == "2"


def test_an_instance_dying_after_content_ends_the_stream_in_band(cluster: Cluster) -> None:
    cluster.instance("a")
    cluster.instance("b")
    cluster.fleet("b", spec=provider("remote", behaviour="healthy:token_interval=0.2,tokens=60"))
    wait_until(lambda: cluster.sees("a", "remote"))
    body = {**CHAT, "stream": True, "max_tokens": 60}
    with httpx.stream("POST", cluster.instances["a"]["url"] + "/v1/chat/completions",
                      json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "Hello" in first or "choices" in first
        cluster.kill("b")
        rest = [line for line in lines if line]
    assert any('"error"' in line for line in rest)
    assert rest[-1] == "data: [DONE]"


def test_providers_of_a_dead_instance_come_back_through_another(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.instance(name)
    cluster.fleet("b", "c", spec=provider("mover"))
    wait_until(lambda: cluster.sees("a", "mover"))
    cluster.kill("b")
    wait_until(lambda: cluster.chat("a").status_code == 200, timeout=40,
               what="the provider back, through c")
    reply = cluster.chat("a")
    assert reply.headers["x-provider-id"] == "mover"
    assert reply.headers.get("x-provider-instance") == "c"


def test_without_redis_instances_serve_their_own_and_rejoin(cluster: Cluster) -> None:
    cluster.instance("a")
    cluster.instance("b")
    cluster.fleet("a", spec=provider("own", model="only-a"))
    cluster.fleet("b", spec=provider("far"))
    # Both registered before the outage: an explicit id cannot be pinned without Redis.
    wait_until(lambda: cluster.sees("a", "far") and cluster.sees("a", "own"))
    cluster.stop_redis()
    wait_until(lambda: cluster.health("a")["cluster"] == "degraded", what="degraded")
    own = cluster.chat("a", model="only-a")
    assert own.status_code == 200 and own.headers["x-provider-id"] == "own"
    wait_until(lambda: not cluster.sees("a", "far"), what="the remote provider forgotten")
    cluster.start_redis()
    wait_until(lambda: cluster.health("a")["cluster"] == "ok", timeout=30, what="rejoined")
    wait_until(lambda: cluster.sees("a", "far"), timeout=30, what="far again")
    back = cluster.chat("a")
    assert back.status_code == 200 and back.headers["x-provider-id"] == "far"


class RecordingProxy:
    """A TCP relay on loopback that keeps every byte it forwards, both ways."""

    def __init__(self, target: int) -> None:
        self.target, self.upstream, self.downstream = target, bytearray(), bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
                for a, b, log in ((client, upstream, self.upstream),
                                  (upstream, client, self.downstream)):
                    threading.Thread(target=self._pump, args=(a, b, log), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, log: bytearray) -> None:
        with contextlib.suppress(OSError), source, sink:
            while data := source.recv(65536):
                log += data
                sink.sendall(data)

    def messages_sent(self) -> list[str]:
        """The WebSocket messages the linking instance sent, unmasked (wsproto decodes)."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request, TextMessage

        server, texts, partial = WSConnection(ConnectionType.SERVER), [], ""
        head, _, frames = bytes(self.upstream).partition(b"\r\n\r\n")
        server.receive_data(head + b"\r\n\r\n")
        assert any(isinstance(e, Request) for e in server.events())
        server.send(AcceptConnection())
        server.receive_data(frames)
        for event in server.events():
            if isinstance(event, TextMessage):
                partial += event.data
                if event.message_finished:
                    texts.append(partial)
                    partial = ""
        return texts


def test_the_link_between_instances_carries_only_ciphertext(cluster: Cluster) -> None:
    cluster.instance("a")
    peer_port = free_port()
    proxy = RecordingProxy(peer_port)
    cluster.instance("b", COORDINATOR_CLUSTER_PORT=str(peer_port),
                     COORDINATOR_ADVERTISE_PORT=str(proxy.port))
    cluster.fleet("b", spec=provider("on-b"))
    wait_until(lambda: cluster.sees("a", "on-b"))
    canary = "canary-7f3a9c-the-prompt-must-not-cross-in-the-clear"
    reply = cluster.chat("a", messages=[{"role": "user", "content": canary}])
    assert reply.status_code == 200, reply.text
    assert reply.headers.get("x-provider-instance") == "b", reply.headers
    relays = [json.loads(m) for m in proxy.messages_sent() if '"relay"' in m]
    assert len(relays) == 1, relays  # the request did cross this link ...
    assert relays[0]["lease"]["provider_id"] == "on-b"
    sealed = json.loads(relays[0]["frame"])
    assert sealed["type"] == "inference_request" and sealed["encrypted_body"]
    everything = "".join(proxy.messages_sent()) + proxy.downstream.decode("latin-1")
    assert canary not in everything  # ... sealed for the provider alone, both ways
    assert "hello" not in everything.lower().replace('"hello"', "")  # nor the other prompts


def test_a_consumer_leaving_cancels_on_the_far_instance(cluster: Cluster) -> None:
    cluster.instance("a")
    cluster.instance("b")
    cluster.fleet("b", spec=provider("far", behaviour="healthy:token_interval=0.2,tokens=100"))
    wait_until(lambda: cluster.sees("a", "far"))

    def in_use(name: str) -> int:
        return sum(p["slots"]["in_use"] for p in cluster.admin(name)["providers"])

    body = {**CHAT, "stream": True, "max_tokens": 100}
    with httpx.stream("POST", cluster.instances["a"]["url"] + "/v1/chat/completions",
                      json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()  # held: closing this generator closes the response
        while '"content":"' not in next(lines).replace('"content":""', ""):
            pass
        assert in_use("b") == 1 and in_use("a") == 1
    # Left after one token of a 20-second answer: b's slot comes back within moments,
    # which only a cancel carried from a to b (and on to the provider) can do.
    started = time.monotonic()
    wait_until(lambda: in_use("b") == 0 and in_use("a") == 0, timeout=10, what="slots freed")
    assert time.monotonic() - started < 10
    again = cluster.chat("a", max_tokens=2)
    assert again.status_code == 200 and again.headers["x-provider-id"] == "far"


def _logged(cluster: Cluster, name: str, text: bytes) -> bool:
    return text in Path(cluster.instances[name]["log"]).read_bytes()


def test_an_explicit_id_stays_with_its_key_on_every_instance(cluster: Cluster) -> None:
    """A second key claiming a live id elsewhere is refused, and locks nobody out."""
    for name in ("a", "b"):
        cluster.instance(name)
    cluster.fleet("a", "b", spec=provider("prov-a"))  # the owner, on a first
    wait_until(lambda: cluster.sees("b", "prov-a"), what="the owner in b's directory")
    thief = cluster.fleet("b", spec=provider("prov-a"))  # the same id, its own key
    wait_until(lambda: _logged(cluster, "b", b"provider id prov-a is bound to another key"),
               what="the second key refused on b")
    reply = cluster.chat("b", provider_ids=["prov-a"])
    assert reply.status_code == 200 and reply.headers.get("x-provider-instance") == "a"
    thief.terminate()
    thief.wait(10)
    cluster.kill("a")  # the owner comes back through b, where the other key was refused
    wait_until(lambda: cluster.chat("b", provider_ids=["prov-a"]).status_code == 200,
               timeout=40, what="the owner admitted on b")
    assert cluster.chat("b", provider_ids=["prov-a"]).headers.get("x-provider-instance") is None


def test_an_id_is_pinned_fleet_wide_until_an_operator_unpins_it(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.instance(name)
    owner = cluster.fleet("a", spec=provider("prov-b"))
    wait_until(lambda: cluster.sees("b", "prov-b"), what="the owner registered")
    owner.terminate()
    owner.wait(10)
    # b's view of a's providers is a's directory page, re-read every cluster_refresh:
    # wait for both, or b may still list the owner when the other key is refused.
    wait_until(lambda: not cluster.sees("a", "prov-b") and not cluster.sees("b", "prov-b"),
               what="the owner gone on both instances")
    cluster.fleet("b", spec=provider("prov-b"))  # another key, while the owner is away
    wait_until(lambda: _logged(cluster, "b", b"provider id prov-b is bound to another key"),
               what="the other key refused on the other instance")
    assert not cluster.sees("b", "prov-b")
    unpinned = httpx.delete(cluster.instances["a"]["url"] + "/v1/admin/providers/prov-b/pin",
                            headers={"authorization": "Bearer admin"})
    assert unpinned.status_code == 200 and unpinned.json()["pin"] == "removed"
    wait_until(lambda: cluster.sees("b", "prov-b"), timeout=60,
               what="the new key admitted on b once unpinned on a")


def _stream_after_first_content(cluster: Cluster, name: str, during: Callable[[], None],
                                max_tokens: int) -> str:
    """Stream a chat from ``name``; run ``during`` once content flows; the whole body."""
    body = {**CHAT, "stream": True, "max_tokens": max_tokens}
    with httpx.stream("POST", cluster.instances[name]["url"] + "/v1/chat/completions",
                      json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60) as reply:
        assert reply.status_code == 200
        seen, lines = [], reply.iter_lines()
        for line in lines:
            seen.append(line)
            if '"content":"' in line.replace('"content":""', ""):
                break
        during()
        seen.extend(lines)
    return "\n".join(seen)


def test_a_redis_outage_does_not_end_streams_already_on_a_link(cluster: Cluster) -> None:
    """Issue 22 item 5: 8 streams relayed a -> b all ended at outage + cluster_ttl."""
    cluster.instance("a")
    cluster.instance("b")
    cluster.fleet("b", spec=provider("far", behaviour="healthy:token_interval=0.25,tokens=16"))
    wait_until(lambda: cluster.sees("a", "far"))
    started = time.monotonic()
    text = _stream_after_first_content(cluster, "a", cluster.stop_redis, 16)
    assert time.monotonic() - started > 3.0  # it outlived the directory (ttl 1.5 s) ...
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text
    assert len(streamed_content(text).split()) >= 10  # ... and came whole


def test_a_hung_instance_ends_the_streams_on_its_link(cluster: Cluster) -> None:
    """With the directory no longer deciding, the link's own pings notice a hung peer."""
    cluster.instance("a")
    b = cluster.instance("b")
    cluster.fleet("b", spec=provider("far", behaviour="healthy:token_interval=0.25,tokens=400"))
    wait_until(lambda: cluster.sees("a", "far"))
    started = time.monotonic()
    try:
        text = _stream_after_first_content(
            cluster, "a", lambda: b["proc"].send_signal(signal.SIGSTOP), 400)
    finally:
        b["proc"].send_signal(signal.SIGCONT)
    assert time.monotonic() - started < 15.0  # a 100-second answer, cut within moments
    assert '"error"' in text and text.rstrip().endswith("data: [DONE]"), text
    cluster.kill("b")
