"""Which models the coordinator remembers while no provider serves them. Pure.

A request for a model whose providers are all momentarily offline should
wait in the queue, not get 404; a request for a model nobody has ever served
should get 404 at once. So models are remembered after their last provider
leaves — for ``forget_after`` seconds, and at most ``capacity`` of them
(oldest forgotten first) — because every registration may name new models
and nothing a provider sends may grow memory without bound.
"""

from __future__ import annotations

import attrs


@attrs.define
class ModelMemory:
    forget_after: float = 3600.0
    capacity: int = 10_000
    # Models no live provider serves, with when they went offline; oldest first.
    _offline_since: dict[str, float] = attrs.field(factory=dict)

    def came_online(self, model: str) -> None:
        self._offline_since.pop(model, None)

    def went_offline(self, model: str, now: float) -> None:
        self._offline_since.pop(model, None)
        self._offline_since[model] = now
        while len(self._offline_since) > self.capacity:
            del self._offline_since[next(iter(self._offline_since))]

    def remembers(self, model: str, now: float) -> bool:
        since = self._offline_since.get(model)
        if since is None:
            return False
        if now - since >= self.forget_after:
            del self._offline_since[model]
            return False
        return True

    def sweep(self, now: float) -> None:
        """Forget every model offline for longer than ``forget_after``."""
        while self._offline_since:
            model, since = next(iter(self._offline_since.items()))
            if now - since < self.forget_after:
                return
            del self._offline_since[model]

    def names(self) -> list[str]:
        return list(self._offline_since)

    def __len__(self) -> int:
        return len(self._offline_since)
