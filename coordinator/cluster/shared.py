"""What instances share, on Redis: the directory, the breaker, capacity wake-ups.

The seam is small. The registry actor (which never awaits) hands shared
events — a strike, a clear, a freed slot — to :meth:`Shared.offer`, which
queues them on a bounded channel; the tasks here carry them to Redis and
carry what other instances publish back to the actor as messages. Without
``redis_url`` the coordinator runs with :class:`~coordinator.cluster.seam.Solo`,
which shares nothing (and never imports this module or coredis).

On Redis (client: coredis, on Trio through anyio):

* ``coord:dir:<instance>`` — the instance's page of the directory (its peer
  URL and its providers, :mod:`.entries`), rewritten every ``cluster_refresh``
  seconds with a TTL of ``cluster_ttl``: a dead instance's page expires;
* ``coord:strikes:{<provider>|<model>|<shape>}`` and ``coord:cool:{…}`` — the
  shared breaker, updated by one Lua script so two instances cannot race it;
* ``coord:pins`` — explicit provider ids and the signing key each is pinned to
  (a hash, set by one Lua script: the first key to prove an id anywhere keeps
  it, on every instance, across restarts, until an operator removes the pin);
* channel ``coord:events`` — cooldowns entered, keys cleared, slots freed,
  providers renewed (a new session starts clean on every instance): every
  instance applies them within one round trip.

When Redis is unreachable every instance keeps routing to its own providers
(remote ones are forgotten after ``cluster_ttl``), says so once in the log,
sets ``coordinator_cluster_degraded`` and shows "degraded" on the status page,
and rejoins by itself when Redis answers again.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs
import coredis
import coredis.exceptions
import coredis.retry
import orjson
import trio

from coordinator.cluster import entries
from coordinator.cluster.peer import PeerLink, remote_connection
from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.providers.connection import Directory
from coordinator.providers.identity import PinClaim, PinStoreUnavailable
from coordinator.registry.actor import RegistryClient
from coordinator.registry.mirror import Cleared, Freed, Renewed, SharedEvent, Struck
from coordinator.registry.table import Lease
from coordinator.untrusted import printable

log = logging.getLogger(__name__)

EVENTS = "coord:events"
_STRIKE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return tonumber(ARGV[3])
end
redis.call('ZADD', KEYS[1], ms, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return tonumber(ARGV[3])
end
return 0
"""
PINS = "coord:pins"
_CLAIM_PIN = """
local bound = redis.call('HGET', KEYS[1], ARGV[1])
if bound then return {bound, 0} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {ARGV[2], 1}
"""
_RELEASE_PIN = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
# A token Redis keeps for as long as it keeps its data: when it changes (or is gone),
# Redis restarted empty or was flushed, and each instance re-asserts the pins of the
# providers live on it (the pins of providers offline meanwhile survive only with
# Redis persistence: docs/scale-out.md).
EPOCH = "coord:epoch"
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""
_REASSERT_PINS = """
local conflicts = {}
for i = 1, #ARGV, 2 do
  local bound = redis.call('HGET', KEYS[1], ARGV[i])
  if not bound then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  elseif bound ~= ARGV[i + 1] then
    table.insert(conflicts, ARGV[i])
  end
end
return conflicts
"""
# Errors that mean "Redis is not there right now", as coredis, anyio and the OS say it.
UNREACHABLE = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError,
               anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


def _key(parts: tuple[str, str, str]) -> str:
    # In braces: a Redis Cluster hash tag, so a key's strikes and cooldown share a
    # slot and the strike script may touch both.
    return "{" + "|".join(parts) + "}"


def _parts(text: str) -> tuple[str, str, str] | None:
    """The breaker key in ``{provider|model|shape}``; model names may hold '|'."""
    provider, _, rest = text.removeprefix("{").removesuffix("}").partition("|")
    model, _, shape = rest.rpartition("|")
    parts = (provider, model, shape)
    return parts if all(map(_NAME.fullmatch, parts)) else None


# A breaker key's parts are ids (admission): printable ASCII without spaces. Held to that,
# what Redis says cannot put unbounded or unprintable text in the admin JSON and the page.
_NAME = re.compile(r"[\x21-\x7e]{1,256}")


@attrs.define(eq=False)
class RedisShared:
    config: Config
    registry: RegistryClient
    directory: Directory
    metrics: Metrics
    peer_url: str
    # (id, signing key) of the explicit ids live here, re-asserted when Redis lost them.
    live_pins: Callable[[], list[tuple[str, str]]]
    degraded: bool = False
    _epoch: bytes | None = None  # Redis's data epoch as last seen (EPOCH)
    _outbox: trio.MemorySendChannel[SharedEvent] = attrs.field(init=False)
    _inbox: trio.MemoryReceiveChannel[SharedEvent] = attrs.field(init=False)
    _links: dict[str, PeerLink] = attrs.field(factory=dict)
    _seen: dict[str, float] = attrs.field(factory=dict)  # instance -> last page read
    _nursery: trio.Nursery | None = None
    _client: coredis.Redis[bytes] | None = None

    def __attrs_post_init__(self) -> None:
        self._outbox, self._inbox = trio.open_memory_channel[SharedEvent](1024)

    @property
    def status(self) -> str:
        return "degraded" if self.degraded else "ok"

    @property
    def me(self) -> str:
        return self.config.instance_id

    def offer(self, event: SharedEvent) -> None:
        """From the actor: queue an event for Redis; never block, drop when full."""
        try:
            self._outbox.send_nowait(event)
        except trio.WouldBlock:
            self.metrics.cluster_events_dropped.inc()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bound = self.config.redis_timeout
        client = coredis.Redis.from_url(
            self.config.redis_url, decode_responses=False, stream_timeout=bound,
            connect_timeout=bound, pool_timeout=bound,
            # Our loops retry (every cluster_refresh); coredis retrying a hung call
            # would only triple the time before the instance says "degraded".
            retry_policy=coredis.retry.NoRetryPolicy())
        try:
            async with client, trio.open_nursery() as nursery:
                self._nursery, self._client = nursery, client
                strike = client.register_script(_STRIKE)
                nursery.start_soon(self._keep, "publish", self._publish, client)
                nursery.start_soon(self._keep, "mirror", self._mirror, client)
                nursery.start_soon(self._keep, "events", self._listen, client)
                nursery.start_soon(self._keep, "outbox", self._send_events, client, strike)
                nursery.start_soon(self._expire)
                task_status.started()
        except* UNREACHABLE:
            # coredis closing its connections while the coordinator stops (or
            # Redis leaving at that moment): nothing left to share.
            log.debug("shared state closed")

    # -- identity pins (providers/identity.py), asked by the provider edge
    async def claim_pin(self, provider_id: str, signing_key: str,
                        max_pins: int) -> PinClaim | None:
        result = await self._ask(lambda c: c.eval(_CLAIM_PIN, [PINS],
                                                  [provider_id, signing_key, max_pins]))
        if not isinstance(result, list) or len(result) != 2 or not isinstance(result[0], bytes):
            return None
        return PinClaim(result[0].decode(), created=bool(result[1]))

    async def release_pin(self, provider_id: str, signing_key: str) -> None:
        await self._ask(lambda c: c.eval(_RELEASE_PIN, [PINS], [provider_id, signing_key]))

    async def remove_pin(self, provider_id: str) -> bool:
        return bool(await self._ask(lambda c: c.hdel(PINS, [provider_id])))

    async def _ask(self, command: Any) -> Any:
        """One Redis command within the challenge timeout, or PinStoreUnavailable."""
        with trio.move_on_after(self.config.challenge_timeout):
            try:
                if self._client is not None:
                    return await command(self._client)
            except UNREACHABLE as exc:
                raise PinStoreUnavailable(str(exc)[:200]) from None
        raise PinStoreUnavailable("no answer from Redis")

    async def _keep(self, name: str, loop: Any, *args: Any) -> None:
        """Run ``loop`` forever; while Redis is unreachable, say so once and retry."""
        while True:
            try:
                await loop(*args)
            except UNREACHABLE as exc:
                if not self.degraded:
                    log.warning("cluster degraded: Redis unreachable (%s: %s); routing to this "
                                "instance's providers only", name, printable(str(exc)))
                self.degraded = True
                self.metrics.cluster_degraded.set(1)
            await trio.sleep(self.config.cluster_refresh)

    def _healthy(self) -> None:
        if self.degraded:
            log.warning("cluster rejoined: Redis answers again")
        self.degraded = False
        self.metrics.cluster_degraded.set(0)

    # -- the directory
    async def _publish(self, client: coredis.Redis[bytes]) -> None:
        ttl_ms = int(self.config.cluster_ttl * 1000)
        while True:
            await self._keep_pins(client)
            local = await self.registry.local_providers(entries.entry_of)
            page = entries.InstanceEntry(self.me, self.peer_url, tuple(local))
            await client.set(f"coord:dir:{self.me}", orjson.dumps(entries.dump(page)), px=ttl_ms)
            self._healthy()
            await trio.sleep(self.config.cluster_refresh)

    async def _keep_pins(self, client: coredis.Redis[bytes]) -> None:
        """Re-assert the pins of providers live here if Redis lost its data since last time.

        A Redis restarted empty forgot every pin, so any key could claim the id of a
        provider connected here the next time it reconnected; the epoch token tells.
        """
        answer = await client.eval(_EPOCH, [EPOCH], [secrets.token_hex(8)])
        epoch = answer if isinstance(answer, bytes) else None
        if epoch == self._epoch:
            return
        pins = self.live_pins()
        if pins:
            conflicts = await client.eval(_REASSERT_PINS, [PINS],
                                          [part for pair in pins for part in pair])
            for provider_id in conflicts if isinstance(conflicts, list) else ():
                log.warning("provider %s is live here with another key than its pin in Redis",
                            printable(provider_id))
        if self._epoch is not None:
            log.warning("Redis lost its data (restarted empty?): re-asserted the pins of %d "
                        "provider(s) live on this instance", len(pins))
        self._epoch = epoch

    async def _mirror(self, client: coredis.Redis[bytes]) -> None:
        while True:
            pages = await self._read_pages(client)
            now = trio.current_time()
            for page in pages:
                self._seen[page.instance] = now
                link = self._link(page)
                records = [entries.record_of(e, page.instance) for e in page.providers]
                for record in records:
                    if self.directory.get(record.provider_id, record.session, page.instance) is None:
                        self.directory.add(remote_connection(record, link, self.config,
                                                             self._lease_of(record.provider_id)))
                await self.registry.mirror(page.instance, records)
                self._prune(page.instance, {(r.provider_id, r.session) for r in records})
            await self._cool_from_store(client)
            await trio.sleep(self.config.cluster_refresh)

    async def _read_pages(self, client: coredis.Redis[bytes]) -> list[entries.InstanceEntry]:
        keys = [key async for key in client.scan_iter(match="coord:dir:*")]
        pages = []
        for raw in await client.mget(keys) if keys else []:
            if raw is None:
                continue
            try:
                page = entries.load(orjson.loads(raw))
            except orjson.JSONDecodeError:
                page = None
            if page is not None and page.instance != self.me:
                pages.append(page)
        return pages

    async def _expire(self) -> None:
        """Instances unseen for ``cluster_ttl`` (gone, or Redis away): route around them.

        A loop of its own, not the mirror's: it must run while Redis is away.
        """
        while True:
            await self._forget_stale(trio.current_time())
            await trio.sleep(self.config.cluster_refresh)

    async def _forget_stale(self, now: float) -> None:
        for instance, seen in list(self._seen.items()):
            if now - seen > self.config.cluster_ttl:
                del self._seen[instance]
                await self.registry.mirror(instance, [])
                self._prune(instance, set())
                link = self._links.pop(instance, None)
                if link is not None:
                    link.retire()  # closes once the streams on it are done

    def _link(self, page: entries.InstanceEntry) -> PeerLink:
        link = self._links.get(page.instance)
        if link is None or link.url != page.peer_url:
            if link is not None:
                link.retire()
            link = PeerLink(page.instance, page.peer_url, self.me, self.config.cluster_token,
                            self.config)
            self._links[page.instance] = link
            assert self._nursery is not None
            self._nursery.start_soon(link.run)
        return link

    def _prune(self, instance: str, keep: set[tuple[str, int]]) -> None:
        """Forget ``instance``'s providers not in ``keep``, for routing only.

        Their streams in flight are not ended here: a provider that left its
        instance is reported by that instance's relay, and an instance that went
        by its link (``PeerLink``) — the directory going quiet (Redis away) says
        neither.
        """
        for connection in self.directory.live():
            if connection.instance == instance and \
                    (connection.provider_id, connection.session) not in keep:
                self.directory.remove(connection)

    def _lease_of(self, provider_id: str) -> Callable[[str], Awaitable[Lease | None]]:
        async def find(request_id: str) -> Lease | None:
            return await self.registry.lease_of(provider_id, request_id)
        return find

    # -- the shared breaker and capacity
    async def _send_events(self, client: coredis.Redis[bytes], strike: Any) -> None:
        cfg = self.config
        while True:
            event = await self._inbox.receive()
            match event:
                case Struck(key, _):
                    cooled_ms = await strike(
                        keys=[f"coord:strikes:{_key(key)}", f"coord:cool:{_key(key)}"],
                        args=[int(cfg.breaker_window * 1000), cfg.breaker_strikes,
                              int(cfg.breaker_cooldown * 1000), f"{self.me}:{trio.current_time()}"])
                    if cooled_ms:
                        await client.publish(EVENTS, orjson.dumps(
                            {"cool": list(key), "seconds": int(cooled_ms) / 1000}))
                case Cleared(key):
                    await client.delete([f"coord:strikes:{_key(key)}", f"coord:cool:{_key(key)}"])
                    await client.publish(EVENTS, orjson.dumps({"clear": list(key)}))
                case Freed(provider_id, in_use):
                    await client.publish(EVENTS, orjson.dumps(
                        {"freed": provider_id, "in_use": in_use, "from": self.me}))
                case Renewed(provider_id):
                    await self._forget_keys(client, provider_id)
                    await client.publish(EVENTS, orjson.dumps(
                        {"renewed": provider_id, "from": self.me}))

    async def _forget_keys(self, client: coredis.Redis[bytes], provider_id: str) -> None:
        """A new session starts clean: its strikes and cooldowns on record go."""
        # Provider ids are header-safe (admission); '*' '?' '[' cannot occur.
        for prefix in ("coord:strikes:", "coord:cool:"):
            keys = [k async for k in client.scan_iter(match=f"{prefix}{{{provider_id}|*")]
            if keys:
                await client.delete(keys)

    async def _listen(self, client: coredis.Redis[bytes]) -> None:
        async with client.pubsub(channels=[EVENTS]) as pubsub:
            async for message in pubsub:
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                if not isinstance(data, bytes | str):
                    continue
                try:
                    await self._apply(orjson.loads(data))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    async def _apply(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if "cool" in event:
            await self.registry.shared(cool=(_triple(event["cool"]), float(event["seconds"])))
        elif "clear" in event:
            await self.registry.shared(clear=_triple(event["clear"]))
        elif "renewed" in event and event.get("from") != self.me:
            await self.registry.shared(renewed=str(event["renewed"]))
        elif "freed" in event and event.get("from") != self.me:
            await self.registry.shared(freed=(str(event["freed"]), int(event["in_use"])))

    async def _cool_from_store(self, client: coredis.Redis[bytes]) -> None:
        """Cooldowns on record (for an instance that joined after they were announced)."""
        async for key in client.scan_iter(match="coord:cool:*"):
            left = await client.pttl(key)
            if left > 0:
                parts = _parts(key.decode(errors="replace").removeprefix("coord:cool:"))
                if parts is not None:
                    await self.registry.shared(cool=(parts, left / 1000))


def _triple(value: Any) -> tuple[str, str, str]:
    if not isinstance(value, list | tuple) or len(value) != 3 or not all(
            isinstance(part, str) and _NAME.fullmatch(part) for part in value):
        raise ValueError("not a breaker key")
    return value[0], value[1], value[2]
