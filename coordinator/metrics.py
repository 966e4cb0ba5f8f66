"""Prometheus metrics, one private registry per coordinator instance (tests run many)."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# slots=False: the metric attributes are created in __attrs_post_init__.
@attrs.define(eq=False, slots=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.dispatches = Counter(
            "coordinator_dispatch", "Dispatch attempts by result "
            "(success, retry, retry_precontent, timeout, failure)", ["result"], registry=r)
        self.inband_errors = Counter(
            "coordinator_inband_error", "Errors surfaced in-band after content", ["reason"],
            registry=r)
        self.cooldown_entered = Counter(
            "coordinator_cooldown_entered", "Breaker keys entering cooldown", registry=r)
        self.cooldowns_active = Gauge(
            "coordinator_cooldowns_active", "Breaker keys cooling now", registry=r)
        self.speculative = Counter(
            "coordinator_speculative_dispatch", "Speculative backups dispatched", registry=r)
        self.hedge_budget_exhausted = Counter(
            "coordinator_hedge_budget_exhausted", "Backups not started: the hedge budget "
            "was spent", registry=r)
        self.outpaced = Counter(
            "coordinator_outpaced", "Racers that lost to content from the other racer",
            registry=r)
        self.cluster_degraded = Gauge(
            "coordinator_cluster_degraded", "1 while Redis is unreachable: routing to this "
            "instance's providers only", registry=r)
        self.cluster_events_dropped = Counter(
            "coordinator_cluster_events_dropped", "Shared breaker or capacity events not "
            "sent (the outbox was full)", registry=r)
        self.speculative_wins = Counter(
            "coordinator_speculative_win", "Races won by the backup", registry=r)
        self.queue_depth = Gauge("coordinator_queue_depth", "Requests waiting", registry=r)
        self.queue_wait = Histogram(
            "coordinator_queue_wait_seconds", "Time spent queued", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.time_to_first_content = Histogram(
            "coordinator_time_to_first_content_seconds", "Request start to commit",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.providers_online = Gauge(
            "coordinator_providers_online", "Routable providers by version", ["version"],
            registry=r)
        self.requests = Counter(
            "coordinator_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r)
        self.throttled = Counter(
            "coordinator_requests_refused_by_limit", "Requests a key's limits refused before "
            "any dispatch, by limit (requests, tokens, concurrency, budget, budget_gone, "
            "too_big, model, unavailable)", ["limit"], registry=r)
        self.tokens_charged = Counter(
            "coordinator_tokens_charged", "Tokens charged in the usage ledger, by kind "
            "(prompt, completion)", ["kind"], registry=r)
        # Per key name only when asked (metrics_per_key): keys are an operator's to make,
        # and a label per key is a time series per key.
        self.key_tokens = Counter(
            "coordinator_key_tokens_charged", "Tokens charged, by key name (metrics_per_key)",
            ["key"], registry=r)
        self.frames_rejected = Counter(
            "coordinator_provider_frames_rejected", "Provider frames rejected", ["reason"],
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
