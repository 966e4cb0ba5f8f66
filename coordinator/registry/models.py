"""What the coordinator remembers of models whose providers left. Pure.

Which models are remembered while no provider serves them (:class:`ModelMemory`),
and what their departed providers could serve (:class:`CapabilityMemory`).

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
    forget_after: float  # config.py's model_forget_after
    capacity: int  # config.py's max_known_models
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

    def remembered(self, now: float) -> list[str]:
        """The models remembered at ``now`` (a read: nothing is forgotten here)."""
        return [m for m, since in self._offline_since.items() if now - since < self.forget_after]

    def __len__(self) -> int:
        return len(self._offline_since)


@attrs.define
class CapabilityMemory:
    """What the providers of each model that left could serve (tool calls, images).

    A request needing a capability that no provider of its model has ever had is
    refused for good (400); one whose capable providers are only away — restarting,
    reconnecting, on an instance whose directory expired — may be served when they
    are back (503, retry). So a provider that leaves leaves its capability set
    behind (``gates.capabilities``), for as long as its models are remembered:
    ``forget_after`` seconds, at most ``capacity`` models (oldest departure forgotten
    first), and per model one entry per distinct capability set (four at most).
    """

    forget_after: float  # config.py's model_forget_after
    capacity: int  # config.py's max_known_models
    # model -> capability set -> when a provider with it last left; the model whose
    # latest departure is oldest first, so expiry and eviction take from the front.
    _left: dict[str, dict[frozenset[str], float]] = attrs.field(factory=dict)

    def left(self, model: str, capabilities: frozenset[str], now: float) -> None:
        sets = self._left.pop(model, {})
        sets[capabilities] = now
        self._left[model] = sets
        while self._left:
            oldest, first = next(iter(self._left.items()))
            if len(self._left) <= self.capacity and now - max(first.values()) < self.forget_after:
                return
            del self._left[oldest]

    def of(self, model: str, now: float) -> list[frozenset[str]] | None:
        """The capability sets of ``model``'s providers that left within ``forget_after``;
        None when no such departure is remembered (the model's past is unknown)."""
        sets = self._left.get(model)
        recent = [c for c, at in (sets or {}).items() if now - at < self.forget_after]
        return recent or None

    def __len__(self) -> int:
        return len(self._left)
