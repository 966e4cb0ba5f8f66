"""The embedded store: one SQLite file (WAL), off the event loop.

Every call runs in a worker thread, one at a time, on one connection: SQLite's own
locking then only has other processes to mind (``coordinator keys`` changing a key
while the coordinator runs). A write another process holds is waited for up to
``busy_timeout``; past that the call fails with :class:`StoreUnavailable` and the
service fails closed until the store answers again.

Tables: ``keys`` (one row a key: its secret's hash, limits, models, state), ``meta``
(``keys_version``, bumped with every key change), ``ledger`` (one row a closed
reservation, keyed by request id: a retried write cannot charge twice). Ledger rows
older than ``retention`` seconds are deleted as new ones are written (every ten minutes).

``:memory:`` (no ``keys_db``: keys live as long as the process) runs inline instead:
no disk to wait for, and a worker thread would let a virtual clock jump under it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from .keys import BudgetWindow, KeyRecord, KeyState, Limits
from .ledger import Entry
from .store import UNNAMED, KeyExists, StoreError, StoreUnavailable, UsageReport, UsageRow

T = TypeVar("T")
BUSY_TIMEOUT_MS = 2000
PRUNE_EVERY = 600.0  # seconds between two deletions of ledger rows past retention
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
    models TEXT, requests_per_minute INTEGER, tokens_per_minute INTEGER,
    concurrent_requests INTEGER, token_budget INTEGER, budget_window TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('keys_version', 0);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY, key TEXT, model TEXT NOT NULL, provider TEXT,
    bound INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, close TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_at ON ledger (at);
CREATE INDEX IF NOT EXISTS ledger_key_at ON ledger (key, at);
"""
_KEY_COLUMNS = ("name, secret_hash, state, models, requests_per_minute, tokens_per_minute, "
                "concurrent_requests, token_budget, budget_window, created")


class SqliteStore:
    """A :class:`~coordinator.accounts.store.Store` in one SQLite file."""

    def __init__(self, connection: sqlite3.Connection, retention: float, *,
                 inline: bool = False) -> None:
        self._db = connection
        self._retention = retention
        self._turn = trio.CapacityLimiter(1)
        self._inline = inline
        self._pruned = 0.0  # wall-clock seconds of the last pruning of the ledger

    @classmethod
    async def open(cls, path: str, *, retention: float = 90 * 86400.0) -> SqliteStore:
        """Open (creating) the file; :class:`StoreError` naming it when that cannot be."""
        inline = path == ":memory:"
        try:
            connection = _connect(path) if inline else await trio.to_thread.run_sync(
                _connect, path)
        except (sqlite3.Error, OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise StoreError(f"keys_db {path}: {exc}") from None
        return cls(connection, retention, inline=inline)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._inline:
                await trio.lowlevel.checkpoint()
                return work(self._db)
            return await trio.to_thread.run_sync(work, self._db, limiter=self._turn)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the keys database: {exc}") from None

    async def version(self) -> int:
        row = await self._run(lambda db: db.execute(
            "SELECT v FROM meta WHERE k = 'keys_version'").fetchone())
        return int(row[0])

    async def keys(self) -> list[KeyRecord]:
        rows = await self._run(lambda db: db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys").fetchall())
        return [_record(row) for row in rows]

    async def add(self, record: KeyRecord) -> None:
        def add(db: sqlite3.Connection) -> None:
            with db:
                db.execute(f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           _row(record))
                _bump(db)
        try:
            await self._run(add)
        except sqlite3.IntegrityError:
            raise KeyExists(record.name) from None

    async def update(self, record: KeyRecord) -> None:
        def update(db: sqlite3.Connection) -> None:
            with db:
                db.execute(f"REPLACE INTO keys ({_KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           _row(record))
                _bump(db)
        await self._run(update)

    async def record(self, entries: Sequence[Entry]) -> None:
        rows = [(e.request_id, e.key, e.model, e.provider, e.bound, e.prompt_tokens,
                 e.completion_tokens, e.close.value, e.at) for e in entries]
        newest = max((e.at for e in entries), default=0.0)
        prune = newest - self._pruned >= PRUNE_EVERY

        def record(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("INSERT OR IGNORE INTO ledger VALUES (?,?,?,?,?,?,?,?,?)", rows)
                if prune:
                    db.execute("DELETE FROM ledger WHERE at < ?", (newest - self._retention,))
        await self._run(record)
        if prune:
            self._pruned = newest

    async def charged_since(self, key: str, since: float) -> int:
        row = await self._run(lambda db: db.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM ledger "
            "WHERE key = ? AND at >= ?", (key, since)).fetchone())
        return int(row[0])

    async def usage(self, since: float, until: float) -> UsageReport:
        def query(db: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            sums = ("COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM ledger "
                    "WHERE at >= ? AND at < ? AND close = 'settled'")
            by_key = db.execute(f"SELECT COALESCE(key, ?), {sums} GROUP BY key ORDER BY 1",
                                (UNNAMED, since, until)).fetchall()
            by_provider = db.execute(
                f"SELECT provider, {sums} AND provider IS NOT NULL GROUP BY provider "
                "ORDER BY 1", (since, until)).fetchall()
            return by_key, by_provider
        by_key, by_provider = await self._run(query)
        return UsageReport(since, until, tuple(UsageRow(*r) for r in by_key),
                           tuple(UsageRow(*r) for r in by_provider))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self._inline:
                self._db.close()
            else:
                await trio.to_thread.run_sync(self._db.close, limiter=self._turn)


def default_path() -> Path:
    """``coordinator serve``'s keys file: ``$XDG_STATE_HOME/trio-inference-coordinator/keys.db``
    (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "trio-inference-coordinator" / "keys.db"


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        # Hashes of secrets and everyone's usage: for this user's eyes only.
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL (journal mode {mode})")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never torn
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _bump(db: sqlite3.Connection) -> None:
    db.execute("UPDATE meta SET v = v + 1 WHERE k = 'keys_version'")


def _row(record: KeyRecord) -> tuple[Any, ...]:
    limits = record.limits
    models = json.dumps(sorted(record.models)) if record.models is not None else None
    return (record.name, record.secret_hash, record.state.value, models,
            limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests,
            limits.token_budget, limits.budget_window.value, record.created)


def _record(row: Sequence[Any]) -> KeyRecord:
    (name, secret_hash, state, models, rpm, tpm, concurrent, budget, window, created) = row
    return KeyRecord(
        name, secret_hash,
        Limits(rpm, tpm, concurrent, budget, BudgetWindow(window)),
        frozenset(json.loads(models)) if models is not None else None,
        KeyState(state), float(created))
