"""The accounts service: what the HTTP edge asks about keys, limits and the ledger.

Theory of operation. Keys live in the store (SQLite or Redis) and, for speed, in
memory: a request is authenticated by a dictionary lookup of its secret's hash
(:meth:`Accounts.authenticate`). The service asks the store for its version every
:data:`REFRESH` seconds and reloads the keys when it moved, so a key revoked anywhere
is refused here within that.

Limits are decided before any dispatch (:meth:`Accounts.admit`): in this process
(:class:`LocalLimits`, the embedded default) or atomically across instances (the Redis
store's limits). An admitted request holds a reservation in the ledger
(:mod:`.ledger`), closed exactly once by :meth:`Accounts.settle` or
:meth:`Accounts.refund` — both synchronous, so a request's ``finally`` can close it
without awaiting. Closed reservations go to the store in the background, batched
(:meth:`Accounts.run`), through a bounded outbox: when the store cannot keep up or
fails, new requests are refused (503, saying why) until it answers again, so nothing
charged is dropped. Keys from ``COORDINATOR_API_KEYS`` are unnamed and unlimited, and
their usage is counted too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import trio

from coordinator.metrics import Metrics
from coordinator.untrusted import printable

from . import limits
from .keys import KeyRecord, KeySpecError, KeyState, Limits, hash_secret, new_secret
from .ledger import Entry, Ledger, Reservation
from .store import UNNAMED as UNNAMED_KEY
from .store import KeyExists, Store, StoreUnavailable, UsageReport

log = logging.getLogger(__name__)

REFRESH = 0.5  # seconds between two looks at the store's version
OUTBOX = 10_000  # closed reservations waiting for the store, at most
BATCH = 512  # written in one transaction, at most
LAST_WRITE = 5.0  # seconds the ledger's last writes may take at exit


@attrs.frozen
class Account:
    """Who a request came from: a named key, or an unnamed one (COORDINATOR_API_KEYS)."""

    key: KeyRecord | None

    @property
    def name(self) -> str | None:
        return self.key.name if self.key is not None else None


UNNAMED = Account(None)


@attrs.define
class KeyStats:
    """What one key did on this instance since it started (the status page's column)."""

    admitted: int = 0
    refused: int = 0  # over a limit, or a model it may not use
    charged: int = 0  # tokens
    in_flight: int = 0


STATUS_ROWS = 100  # keys the status page lists, busiest first


@attrs.frozen
class Granted:
    reservation: Reservation
    headers: dict[str, str]


@attrs.frozen
class Refused:
    """Not admitted: over a limit (``throttled``), a model the key may not use, or the store
    is unavailable (``unavailable``, a 503)."""

    message: str
    throttled: limits.Throttled | None = None
    model_not_allowed: bool = False
    unavailable: bool = False


class Limiter(Protocol):
    async def admit(self, key: KeyRecord, bound: int, now: float) -> limits.Admitted | limits.Throttled:
        ...

    def release(self, key: KeyRecord, bound: int, charged: int, period: str, now: float) -> None:
        ...


@attrs.define(eq=False)
class LocalLimits:
    """Limits kept in this process (one instance: the embedded default)."""

    wall: Any  # () -> wall-clock seconds, for budget windows
    uses: dict[str, limits.KeyUse] = attrs.field(factory=dict)

    def use_of(self, key: KeyRecord, now: float) -> limits.KeyUse:
        use = self.uses.get(key.name)
        if use is None:
            use = self.uses[key.name] = limits.KeyUse.fresh(key.limits, now)
        return use

    async def admit(self, key: KeyRecord, bound: int, now: float) -> limits.Admitted | limits.Throttled:
        wall = self.wall()
        window = limits.window_of(key.limits.budget_window, wall)
        return limits.admit(key.limits, self.use_of(key, now), bound, now, window.name,
                            window.left(wall))

    def release(self, key: KeyRecord, bound: int, charged: int, period: str, now: float) -> None:
        use = self.uses.get(key.name)
        if use is not None:
            limits.settle(use, bound, charged, now, period)


@attrs.define(eq=False)
class Accounts:
    store: Store
    static_keys: frozenset[str] = frozenset()  # hashes of COORDINATOR_API_KEYS' secrets
    limiter: Limiter | None = None  # None: LocalLimits
    wall: Any = time.time  # wall-clock seconds: budget windows and the ledger's times only
    metrics: Metrics | None = None
    metrics_per_key: bool = False
    _keys: dict[str, KeyRecord] = attrs.field(factory=dict)  # by secret hash
    _by_name: dict[str, KeyRecord] = attrs.field(factory=dict)
    _version: int | None = None
    ledger: Ledger = attrs.field(factory=Ledger)
    _outbox: trio.MemorySendChannel[Entry] = attrs.field(init=False)
    _inbox: trio.MemoryReceiveChannel[Entry] = attrs.field(init=False)
    failing: str | None = None  # why the store cannot be used now, when it cannot
    _unwritten: int = 0  # closed reservations not yet in the store
    stats: dict[str, KeyStats] = attrs.field(factory=dict)  # by key name, "(unnamed)" too
    _progress: trio.Event = attrs.field(factory=trio.Event)  # set (and replaced) after each
    # batch written and each failure

    def __attrs_post_init__(self) -> None:
        self._outbox, self._inbox = trio.open_memory_channel[Entry](OUTBOX)
        if self.limiter is None:
            self.limiter = LocalLimits(self.wall)

    # -- keys
    async def load(self) -> None:
        """Read every key (and each budget's use in its window) from the store."""
        version = await self.store.version()
        self._install(await self.store.keys())
        self._version = version
        if isinstance(self.limiter, LocalLimits):
            await self._recall_budgets(self.limiter)

    def _install(self, records: Iterable[KeyRecord]) -> None:
        self._by_name = {r.name: r for r in records}
        self._keys = {r.secret_hash: r for r in self._by_name.values()}
        if isinstance(self.limiter, LocalLimits):
            now = trio.current_time()
            for record in self._by_name.values():
                use = self.limiter.uses.get(record.name)
                if use is not None:
                    use.follow(record.limits, now)

    async def _recall_budgets(self, local: LocalLimits) -> None:
        """A budget's use survives a restart: it is the ledger's sum over the window."""
        now, wall = trio.current_time(), self.wall()
        for record in self._by_name.values():
            if record.limits.token_budget is None:
                continue
            window = limits.window_of(record.limits.budget_window, wall)
            use = local.use_of(record, now)
            use.period, use.budget_used = window.name, await self.store.charged_since(
                record.name, window.start)

    def authenticate(self, secret: str) -> Account | None:
        """The account ``secret`` proves, or None (no such key, or revoked)."""
        digest = hash_secret(secret)
        record = self._keys.get(digest)
        if record is not None:
            return Account(record) if record.state is KeyState.ACTIVE else None
        return UNNAMED if digest in self.static_keys else None

    def key(self, name: str) -> KeyRecord | None:
        return self._by_name.get(name)

    def all_keys(self) -> list[KeyRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    # -- one request
    async def admit(self, account: Account, request_id: str, model: str, prompt_estimate: int,
                    completion_reserved: int, completion_ceiling: int) -> Granted | Refused:
        """Reserve a request's bound (its prompt estimate and ``completion_reserved``), or
        say why it may not go now. ``completion_ceiling``: the most it can be charged for
        its answer (its ``max_tokens``)."""
        bound = prompt_estimate + completion_reserved
        if self.failing is not None and (account.key is not None or self._no_room()):
            return Refused(f"the accounts store is unavailable ({self.failing}); try again "
                           "shortly", unavailable=True)
        key = account.key
        headers: dict[str, str] = {}
        period = ""
        if key is not None:
            if key.models is not None and model not in key.models:
                self._stats(key.name).refused += 1
                return Refused(f"this key may not use the model {printable(model, 256)!r}",
                               model_not_allowed=True)
            assert self.limiter is not None
            try:
                decision = await self.limiter.admit(key, bound, trio.current_time())
            except StoreUnavailable as exc:
                return Refused(str(exc), unavailable=True)
            if isinstance(decision, limits.Throttled):
                self._stats(key.name).refused += 1
                return Refused(_throttled_message(decision), throttled=decision)
            headers = decision.headers
            period = limits.window_of(key.limits.budget_window, self.wall()).name
        reservation = Reservation(request_id, account.name, model, prompt_estimate,
                                  completion_reserved, completion_ceiling, period)
        self.ledger.reserve(reservation)
        stats = self._stats(account.name or UNNAMED_KEY)
        stats.admitted += 1
        stats.in_flight += 1
        return Granted(reservation, headers)

    def _no_room(self) -> bool:
        """Whether one more request's entry might not fit in the outbox. While the store
        fails, the shared keys (no limits to check, no revocation to miss) go on until
        the entries waiting for it, and those of the requests running, fill it."""
        return self._unwritten + len(self.ledger.open) >= OUTBOX

    def _stats(self, name: str) -> KeyStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = KeyStats()
        return stats

    def status_rows(self) -> list[dict[str, Any]]:
        """The busiest keys here (at most :data:`STATUS_ROWS`), for the status page."""
        busiest = sorted(self.stats.items(), key=lambda kv: (-kv[1].charged, kv[0]))
        rows = []
        for name, stats in busiest[:STATUS_ROWS]:
            record = self._by_name.get(name)
            rows.append({"name": name, **attrs.asdict(stats),
                         "state": record.state.value if record is not None else "static",
                         "limits": record.limits.as_json() if record is not None else None})
        return rows

    def settle(self, request_id: str, provider: str | None, prompt_tokens: int,
               completion_tokens: int) -> Entry | None:
        """Charge what a request used (clamped: :mod:`.ledger`); None if already closed."""
        closed = self.ledger.settle(request_id, provider, prompt_tokens, completion_tokens,
                                    self.wall())
        return self._closed(closed)

    def refund(self, request_id: str) -> Entry | None:
        """Charge nothing (nothing reached the consumer); None if already closed."""
        return self._closed(self.ledger.refund(request_id, self.wall()))

    def _closed(self, closed: tuple[Reservation, Entry] | None) -> Entry | None:
        if closed is None:
            return None
        reservation, entry = closed
        stats = self._stats(reservation.key or UNNAMED_KEY)
        stats.in_flight -= 1
        stats.charged += entry.charged
        if self.metrics is not None and entry.charged:
            self.metrics.tokens_charged.labels("prompt").inc(entry.prompt_tokens)
            self.metrics.tokens_charged.labels("completion").inc(entry.completion_tokens)
            if self.metrics_per_key:
                self.metrics.key_tokens.labels(reservation.key or UNNAMED_KEY).inc(entry.charged)
        key = self._by_name.get(reservation.key) if reservation.key is not None else None
        if key is not None:
            assert self.limiter is not None
            self.limiter.release(key, reservation.bound, entry.charged, reservation.period,
                                 trio.current_time())
        try:
            self._outbox.send_nowait(entry)
            self._unwritten += 1
        except trio.WouldBlock:  # the store is not keeping up: refuse new requests meanwhile
            self.failing = "the ledger is not being written fast enough"
            log.error("accounts: the ledger outbox is full; a closed reservation of %s is "
                      "not recorded", printable(reservation.key))
        return entry

    # -- the background: writing the ledger, following key changes
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the ledger and follow key changes until cancelled; then write what is
        left (for at most :data:`LAST_WRITE` seconds) and close the store."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                nursery.start_soon(self._follow)
                task_status.started()
        finally:
            with trio.move_on_after(LAST_WRITE, shield=True):
                await self._write_the_rest()
                await self.store.aclose()

    async def _write_the_rest(self) -> None:
        left: list[Entry] = []
        while True:
            try:
                left.append(self._inbox.receive_nowait())
            except trio.WouldBlock:
                break
        for start in range(0, len(left), BATCH):
            try:
                await self.store.record(left[start:start + BATCH])
            except StoreUnavailable as exc:
                log.error("accounts: %d closed reservations could not be written at exit (%s)",
                          len(left) - start, printable(str(exc)))
                return

    async def _write(self) -> None:
        batch: list[Entry] = []
        while True:
            if not batch:
                batch.append(await self._inbox.receive())
            # Everything closed meanwhile goes in one transaction (one costs about what a
            # hundred rows do): under load, entries gather while the last batch is written.
            while len(batch) < BATCH:
                try:
                    batch.append(self._inbox.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.store.record(batch)
            except StoreUnavailable as exc:
                self._fail(str(exc))
                await trio.sleep(REFRESH)  # keep the batch: written once the store answers
                continue
            self._unwritten -= len(batch)
            batch = []
            self._progressed()
            self._recover()

    async def _follow(self) -> None:
        while True:
            await trio.sleep(REFRESH)
            try:
                version = await self.store.version()
                if version != self._version:
                    self._install(await self.store.keys())
                    self._version = version
            except StoreUnavailable as exc:
                self._fail(str(exc))
                continue
            if self.failing is not None and self._unwritten == 0:
                self._recover()  # it answers, and nothing waits for it (else: _write's)
            elif self.failing == "the ledger is not being written fast enough" and \
                    self._inbox.statistics().current_buffer_used < OUTBOX // 2:
                self._recover()

    def _fail(self, why: str) -> None:
        if self.failing is None:
            log.error("accounts: the store failed (%s); new requests are refused until it "
                      "answers again", printable(why))
        self.failing = why
        self._progressed()  # a flush waiting for the store gives up

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _recover(self) -> None:
        if self.failing is not None:
            log.warning("accounts: the store answers again; requests are admitted")
            self.failing = None
            self._progressed()

    async def progressed(self) -> None:
        """Wait until a batch of the ledger is written or the store fails or recovers."""
        await self._progress.wait()

    async def flush(self) -> None:
        """Wait until every closed reservation so far is written (the usage report, a
        test); :class:`StoreUnavailable` while the store is failing."""
        while self._unwritten:
            if self.failing is not None:
                raise StoreUnavailable(self.failing)
            await self._progress.wait()

    # -- administration
    async def create(self, name: str, key_limits: Limits, models: frozenset[str] | None
                     ) -> tuple[KeyRecord, str]:
        """A new key, and its secret (shown once: only its hash is kept)."""
        secret, digest = new_secret(name)
        record = KeyRecord(name, digest, key_limits, models, KeyState.ACTIVE,
                           round(self.wall(), 3))
        try:
            await self.store.add(record)
        except KeyExists:
            raise KeySpecError(f"a key named {name!r} exists already", "name") from None
        await self._reload()
        return record, secret

    async def change(self, record: KeyRecord) -> KeyRecord:
        await self.store.update(record)
        await self._reload()
        return record

    async def _reload(self) -> None:
        version = await self.store.version()
        self._install(await self.store.keys())
        self._version = version

    async def usage(self, since: float, until: float) -> UsageReport:
        return await self.store.usage(since, until)


def _throttled_message(throttled: limits.Throttled) -> str:
    what = {
        limits.Refusal.REQUESTS: "requests per minute",
        limits.Refusal.TOKENS: "tokens per minute",
        limits.Refusal.CONCURRENCY: "concurrent requests",
        limits.Refusal.BUDGET: "token budget for this window",
        limits.Refusal.BUDGET_GONE: "token budget",
        limits.Refusal.TOO_BIG: "tokens (this request's bound alone exceeds it)",
    }[throttled.refusal]
    if throttled.retry_after is None:
        return f"this key is over its limit of {what}"
    return f"this key is over its limit of {what}; retry in {math.ceil(throttled.retry_after)}s"
