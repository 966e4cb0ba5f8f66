"""The shared store: keys and the ledger in Redis, so every instance of a cluster sees them.

With ``redis_url`` set, this store replaces the SQLite file (``keys_db`` is then not
used) and :class:`~.redislimits.RedisLimits` keeps the limits' state next to it. The
layout (every name under ``coord:acct:``; a part in braces is a Redis Cluster hash
tag, so one script's keys share a slot):

* ``coord:acct:{keys}`` — the index: a set of key names;
* ``coord:acct:{keys}:<name>`` — one hash a key: ``secret_hash`` (the SHA-256 only, never
  the secret), ``state``, ``models`` (JSON, absent: any), the limits (absent: none),
  ``budget_window``, ``created``;
* ``coord:acct:{keys}:version`` — bumped (``INCR``) by the one script that makes each
  change; it starts from a random number, so a Redis restarted empty cannot come back
  to a version an instance already holds and keep it from reloading;
* ``coord:acct:usage:{<hour>}`` — the ledger, counted per UTC hour (``<hour>`` is
  ``at // 3600``): a hash of ``k:<r|p|c>:<key name>`` and ``p:<r|p|c>:<provider id>``
  (requests, prompt and completion tokens), kept ``ledger_retention`` seconds past
  its hour;
* ``coord:acct:ids:{<hour>}`` — the request ids counted in that hour: a retried write
  of the same closed reservation (its reply lost, say) adds nothing. Kept
  :data:`IDS_KEPT` seconds after its last write: far longer than a batch is retried
  for while Redis answers.

Only settled reservations are counted (a refund charges nothing and is not a request
in the report, as in the SQLite store). Usage is therefore known per whole hour:
:meth:`RedisStore.usage` widens ``[since, until)`` to whole UTC hours and says so in
the report's ``since`` and ``until``; :meth:`RedisStore.charged_since` is exact for a
budget window, which always starts on an hour.

Every call is bounded by ``redis_timeout``; an error or no answer in time is
:class:`~.store.StoreUnavailable` (the service fails closed, 503, and recovers by
itself). A Redis that cannot be reached at start-up is :class:`~.store.StoreError`.
What Redis holds is read as outside input: a key hash that breaks the rules an
admin's key meets is left out, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import anyio
import attrs
import coredis
import coredis.exceptions
import coredis.retry
import trio

from coordinator.config import Config
from coordinator.untrusted import printable

from . import keys
from .keys import KeyRecord, KeySpecError
from .ledger import Close, Entry
from .store import UNNAMED, KeyExists, StoreError, StoreUnavailable, UsageReport, UsageRow

log = logging.getLogger(__name__)

T = TypeVar("T")
INDEX: Final = "coord:acct:{keys}"
VERSION: Final = "coord:acct:{keys}:version"
HOUR: Final = 3600
IDS_KEPT: Final = 2 * 3600  # seconds a counted request id is remembered after its last write
CHUNK: Final = 256  # entries, keys or hours in one script call or pipeline, at most
# Errors that mean "Redis is not there right now", as coredis, anyio and the OS say it
# (cluster/shared.py has the same list; accounts sits below it in the layers).
UNREACHABLE = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError,
               anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)

_BUMP = """
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[2]) end
redis.call('INCR', KEYS[3])
"""
# KEYS: the index, the key's hash, the version; ARGV: name, a random first version,
# then the hash's fields and values.
_ADD = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
""" + _BUMP + "return 1"
_PUT = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
""" + _BUMP + "return 1"
# KEYS: the hour's ids, the hour's usage; ARGV: the ids' TTL, the usage's expiry (UTC
# seconds), then five a reservation: request id, key name, provider ('' for none),
# prompt and completion tokens. A request id already counted adds nothing.
_RECORD = """
local fresh = 0
for i = 3, #ARGV, 5 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    fresh = fresh + 1
    local who = {'k:', ARGV[i + 1]}
    if ARGV[i + 2] ~= '' then who[3], who[4] = 'p:', ARGV[i + 2] end
    for w = 1, #who, 2 do
      redis.call('HINCRBY', KEYS[2], who[w] .. 'r:' .. who[w + 1], 1)
      redis.call('HINCRBY', KEYS[2], who[w] .. 'p:' .. who[w + 1], ARGV[i + 3])
      redis.call('HINCRBY', KEYS[2], who[w] .. 'c:' .. who[w + 1], ARGV[i + 4])
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[2], ARGV[2])
return fresh
"""


def key_hash(name: str) -> str:
    return f"{INDEX}:{name}"


def ids_of(hour: int) -> str:
    return f"coord:acct:ids:{{{hour}}}"


def usage_of(hour: int) -> str:
    return f"coord:acct:usage:{{{hour}}}"


@attrs.define(eq=False)
class RedisLink:
    """The one coredis client of the accounts, each call bounded by ``timeout`` seconds."""

    client: coredis.Redis[bytes]
    timeout: float

    async def call(self, command: Awaitable[T]) -> T:
        """``command``'s answer (a coredis call on :attr:`client`), or
        :class:`StoreUnavailable` saying why not."""
        with trio.move_on_after(self.timeout):
            try:
                return await command
            except coredis.exceptions.ResponseError as exc:
                raise StoreUnavailable(f"Redis refused a command: {printable(str(exc), 120)}"
                                       ) from None
            except UNREACHABLE as exc:
                raise StoreUnavailable(f"Redis is unreachable ({type(exc).__name__})") from None
        raise StoreUnavailable(f"Redis did not answer within {self.timeout:g}s")

    @classmethod
    async def open(cls, nursery: trio.Nursery, config: Config) -> RedisLink:
        """Connect (a task of ``nursery`` holds the client until it is cancelled) and make
        sure Redis answers; :class:`StoreError`, one line, when it does not."""
        link: RedisLink = await nursery.start(_hold, config)
        return link


async def _hold(config: Config, *,
                task_status: trio.TaskStatus[RedisLink] = trio.TASK_STATUS_IGNORED
                ) -> None:
    bound = config.redis_timeout
    try:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            config.redis_url, decode_responses=False, stream_timeout=bound,
            connect_timeout=bound, pool_timeout=bound,
            # The service retries (every half second): coredis retrying a hung call
            # would only hold a request longer before it is told why it cannot go.
            retry_policy=coredis.retry.NoRetryPolicy())
    except (ValueError, TypeError) as exc:
        raise StoreError(f"redis_url {shown(config.redis_url)}: {printable(exc, 200)}") from None
    failure = None
    try:
        async with client:
            link = RedisLink(client, bound)
            try:
                await link.call(client.ping())
            except StoreUnavailable as exc:
                failure = str(exc)  # raised below: inside, coredis would wrap it in a group
            else:
                task_status.started(link)
                await trio.sleep_forever()
    except* UNREACHABLE:
        log.debug("accounts: the Redis client closed")  # the coordinator stopping
    if failure is not None:
        raise StoreError(f"redis_url {shown(config.redis_url)}: {failure}")


def shown(url: str) -> str:
    """``url`` without its password, for a message."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            netloc = parts.netloc.rpartition("@")[2]
            user = f"{parts.username}:***@" if parts.username else ":***@"
            parts = parts._replace(netloc=user + netloc)
        return printable(urllib.parse.urlunsplit(parts), 200)
    except ValueError:
        return "(unparsable)"


class RedisStore:
    """A :class:`~coordinator.accounts.store.Store` in Redis, shared by every instance."""

    def __init__(self, link: RedisLink, retention: float,
                 wall: Callable[[], float] = time.time) -> None:
        self.link = link
        self._retention = retention
        self._wall = wall  # the ledger's hours: which exist (retention), which are to come
        client = link.client
        self._add = client.register_script(_ADD)
        self._put = client.register_script(_PUT)
        self._record = client.register_script(_RECORD)

    @classmethod
    async def open(cls, nursery: trio.Nursery, config: Config) -> RedisStore:
        return cls(await RedisLink.open(nursery, config), config.ledger_retention)

    # -- keys
    async def version(self) -> int:
        raw = await self.link.call(self.link.client.get(VERSION))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            raise StoreUnavailable("Redis holds an unreadable keys version") from None

    async def keys(self) -> list[KeyRecord]:
        names = sorted(await self.link.call(self.link.client.smembers(INDEX)))
        records = []
        for chunk in _chunks(names):
            hashes = await self.link.call(
                _hgetall(self.link.client, [key_hash(_text(n)) for n in chunk]))
            for raw_name, fields in zip(chunk, hashes, strict=True):
                record = _record(raw_name, fields)
                if record is not None:
                    records.append(record)
        return records

    async def add(self, record: KeyRecord) -> None:
        added: Any = await self.link.call(self._add(
            keys=[INDEX, key_hash(record.name), VERSION], args=_args(record)))
        if not added:
            raise KeyExists(record.name)

    async def update(self, record: KeyRecord) -> None:
        await self.link.call(self._put(
            keys=[INDEX, key_hash(record.name), VERSION], args=_args(record)))

    # -- the ledger
    async def record(self, entries: Sequence[Entry]) -> None:
        by_hour: dict[int, list[Entry]] = {}
        for entry in entries:
            if entry.close is Close.SETTLED:
                by_hour.setdefault(math.floor(entry.at / HOUR), []).append(entry)
        for hour, settled in sorted(by_hour.items()):
            expires = int((hour + 1) * HOUR + self._retention)
            for chunk in _chunks(settled):
                args: list[str | int] = [IDS_KEPT, expires]
                for e in chunk:
                    args += [e.request_id, e.key or UNNAMED, e.provider or "",
                             e.prompt_tokens, e.completion_tokens]
                await self.link.call(self._record(
                    keys=[ids_of(hour), usage_of(hour)], args=args))

    async def charged_since(self, key: str, since: float) -> int:
        now = self._wall()
        first = max(math.floor(since / HOUR), math.floor((now - self._retention) / HOUR))
        hours = range(first, math.floor(now / HOUR) + 2)  # + an hour ahead: clocks differ
        fields = [f"k:p:{key}", f"k:c:{key}"]
        total = 0
        for chunk in _chunks(hours):
            answers = await self.link.call(_hmget(self.link.client, chunk, fields))
            total += sum(_int(value) for answer in answers for value in answer)
        return total

    async def usage(self, since: float, until: float) -> UsageReport:
        first, end = math.floor(since / HOUR), math.ceil(until / HOUR)
        now = self._wall()
        hours = range(max(first, math.floor((now - self._retention) / HOUR)),
                      min(end, math.floor(now / HOUR) + 2))
        by_key: dict[str, list[int]] = {}
        by_provider: dict[str, list[int]] = {}
        for chunk in _chunks(hours):
            for counts in await self.link.call(
                    _hgetall(self.link.client, [usage_of(h) for h in chunk])):
                _add_counts(counts, by_key, by_provider)
        return UsageReport(float(first * HOUR), float(max(first, end) * HOUR),
                           _rows(by_key), _rows(by_provider))

    async def aclose(self) -> None:
        """Nothing to do: the client closes with the task holding it (:meth:`RedisLink.open`)."""


_METRICS: Final = {"r": 0, "p": 1, "c": 2}


def _add_counts(counts: dict[bytes, bytes], by_key: dict[str, list[int]],
                by_provider: dict[str, list[int]]) -> None:
    for field, value in counts.items():
        kind, _, rest = field.decode(errors="replace").partition(":")
        metric, _, name = rest.partition(":")
        table = by_key if kind == "k" else by_provider if kind == "p" else None
        if table is None or metric not in _METRICS or not name:
            continue
        table.setdefault(name, [0, 0, 0])[_METRICS[metric]] += _int(value)


def _rows(table: dict[str, list[int]]) -> tuple[UsageRow, ...]:
    return tuple(UsageRow(printable(name, 256), *counts)
                 for name, counts in sorted(table.items()))


def _int(value: bytes | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


async def _hgetall(client: coredis.Redis[bytes], names: Sequence[str]
                   ) -> list[dict[bytes, bytes]]:
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
    return list(pipe.results or ())


async def _hmget(client: coredis.Redis[bytes], hours: Sequence[int],
                 fields: list[str]) -> list[tuple[bytes | None, ...]]:
    async with client.pipeline(transaction=False) as pipe:
        for hour in hours:
            pipe.hmget(usage_of(hour), fields)
    return list(pipe.results or ())


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _args(record: KeyRecord) -> list[str]:
    """The key's hash as fields and values (after its name and a random first version)."""
    fields: dict[str, Any] = {"secret_hash": record.secret_hash, "state": record.state.value,
                              "budget_window": record.limits.budget_window.value,
                              "created": repr(record.created)}
    if record.models is not None:
        fields["models"] = json.dumps(sorted(record.models))
    for name, value in record.limits.as_json().items():
        if name != "budget_window" and value is not None:
            fields[name] = str(value)
    return [record.name, str(secrets.randbelow(2**48)),
            *(str(part) for pair in fields.items() for part in pair)]


def _record(raw_name: bytes | str, raw: dict[bytes, bytes]) -> KeyRecord | None:
    """A key as Redis holds it, held to an admin's rules; None (and a warning) if it breaks them."""
    name = _text(raw_name)
    fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    if not fields:
        return None  # the index names a key whose hash is gone: nothing to serve
    try:
        keys.check_name(name)
        secret_hash = fields["secret_hash"]
        if len(secret_hash) != 64 or not all(c in "0123456789abcdef" for c in secret_hash):
            raise KeySpecError("secret_hash is not a SHA-256 in hex", "secret_hash")
        spec: dict[str, Any] = {n: int(fields[n]) for n in
                                ("requests_per_minute", "tokens_per_minute",
                                 "concurrent_requests", "token_budget") if n in fields}
        spec["budget_window"] = fields.get("budget_window", "none")
        models = keys.models_from(json.loads(fields["models"])) if "models" in fields else None
        return KeyRecord(name, secret_hash, keys.limits_from(spec), models,
                         keys.KeyState(fields["state"]), float(fields.get("created", 0.0)))
    except (KeyError, ValueError, TypeError, KeySpecError) as exc:
        log.warning("accounts: key %s in Redis is unreadable (%s); left out",
                    printable(name, 80), printable(exc, 200))
        return None
