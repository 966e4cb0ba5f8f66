"""Identity pins kept in a file, so one instance remembers them across restarts.

Without it a single instance keeps pins in memory, and a restart forgets them:
whichever key proves an explicit id first after the restart gets it. With
``identity_pins_file`` the edge claims an id here exactly as it would in Redis
(:class:`~coordinator.providers.identity.SharedPins`), and the answer is on disk
before the provider is admitted.

The file is append-only JSON lines, one per change: ``{"id": …, "key": …}`` pins
an id, ``{"id": …, "key": null}`` removes the pin. Reading it replays the lines;
a line that is not one of these is skipped with a warning (a torn last line after
a crash, say). When most of the file is history, or a line was skipped, opening
it rewrites it (to a temporary file, then renamed over it) with one line per pin.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

import orjson
import trio

from coordinator.providers.identity import PinClaim, PinStoreUnavailable

log = logging.getLogger(__name__)

_MAX_LINE = 4096  # an id is at most 64 characters and a key 44: anything longer is not ours


class PinFileError(Exception):
    """The pins file cannot be read or written at start-up; the message says why."""


class PinFile:
    """Pins in memory, every change appended to ``path`` (and synced) before it counts."""

    def __init__(self, path: Path, pins: dict[str, str]) -> None:
        self.path = path
        self._pins = pins
        self._writing = trio.Lock()

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> PinFile:
        """Read (and, when mostly history, compact) the file; a missing file is empty.

        Raises :class:`PinFileError` when the file cannot be read or written: found at
        start-up, not when the first provider with an explicit id is refused.
        """
        where = Path(path)
        try:
            pins = await trio.to_thread.run_sync(_load_and_compact, where)
        except OSError as exc:
            raise PinFileError(f"identity_pins_file {where}: {exc.strerror or exc}") from None
        log.info("identity pins: %d read from %s", len(pins), where)
        return cls(where, pins)

    async def claim_pin(self, provider_id: str, signing_key: str,
                        max_pins: int) -> PinClaim | None:
        bound = self._pins.get(provider_id)
        if bound is not None:  # the common case, a provider coming back: no file I/O
            return PinClaim(bound, created=False)
        async with self._writing:  # one change at a time, in memory as on disk
            bound = self._pins.get(provider_id)
            if bound is not None:
                return PinClaim(bound, created=False)
            if len(self._pins) >= max_pins:
                return None
            await self._append(provider_id, signing_key)
            self._pins[provider_id] = signing_key
            return PinClaim(signing_key, created=True)

    async def release_pin(self, provider_id: str, signing_key: str) -> None:
        async with self._writing:
            if self._pins.get(provider_id) == signing_key:
                await self._append(provider_id, None)
                del self._pins[provider_id]

    async def remove_pin(self, provider_id: str) -> bool:
        async with self._writing:
            if provider_id not in self._pins:
                return False
            await self._append(provider_id, None)
            del self._pins[provider_id]
            return True

    async def _append(self, provider_id: str, signing_key: str | None) -> None:
        line = orjson.dumps({"id": provider_id, "key": signing_key}) + b"\n"
        try:
            await trio.to_thread.run_sync(_append_synced, self.path, line)
        except OSError as exc:
            raise PinStoreUnavailable(f"cannot write {self.path}: {exc.strerror or exc}") \
                from None


def _append_synced(path: Path, line: bytes) -> None:
    with path.open("ab") as file:
        end = file.tell()
        try:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        except OSError:
            # A line half written (the disk full, say) would be glued to the next one,
            # which would then be lost: take it back.
            file.truncate(end)
            raise


def _load_and_compact(path: Path) -> dict[str, str]:
    with path.open("ab"):  # created if missing; an error if it could never be written
        pass
    data = path.read_bytes()
    pins: dict[str, str] = {}
    lines = skipped = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        lines += 1
        change = _change(raw)
        if change is None:
            skipped += 1
        elif change[1] is None:
            pins.pop(change[0], None)
        else:
            pins[change[0]] = change[1]
    if skipped:
        log.warning("identity pins file %s: %d unreadable line(s) skipped", path, skipped)
    # Rewritten when mostly history, or when a line is torn (a crash mid-append):
    # the next append would otherwise be glued to it, and lost.
    if lines > 2 * len(pins) + 64 or skipped or not data.endswith(b"\n"):
        _rewrite(path, pins)
    return pins


def _change(raw: bytes) -> tuple[str, str | None] | None:
    """One line as (id, key or None for a removal), or None when it is not a pin change."""
    if len(raw) > _MAX_LINE:
        return None
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        return None
    key = entry.get("key")
    if key is None:
        return entry["id"], None
    if not isinstance(key, str) or not _is_key(key):
        return None
    return entry["id"], key


def _is_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _rewrite(path: Path, pins: dict[str, str]) -> None:
    fresh = path.with_name(path.name + ".new")
    with fresh.open("wb") as file:
        for provider_id, key in pins.items():
            file.write(orjson.dumps({"id": provider_id, "key": key}) + b"\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(fresh, path)
