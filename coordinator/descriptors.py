"""File descriptors: the limit a configuration needs, and accepting when they run out.

Every consumer connection, provider socket and peer link is a descriptor. Below the
process limit (``RLIMIT_NOFILE``, often 1,024 by default) ``accept`` fails with
EMFILE and the connection waits in the kernel's backlog; trio's accept loop then
logged an ERROR with a traceback every 0.1 s (2,222 lines in 25 s). So:

* at start-up, :func:`check_limit` compares the soft limit with what the
  configuration can hold open (:func:`needed`) and raises it, up to the hard
  limit, when it is short; if even the hard limit is short it warns once, with
  the numbers and what to set (docs/operations.md, file descriptors);
* each listener takes its accept failures for want of resources through
  :class:`AcceptErrors`: it waits (0.1 s, doubling up to 1 s) and retries, and
  logs one line when the failures start, one per :data:`LOG_INTERVAL` while they
  last (with their count), and one when accepting works again.
"""

from __future__ import annotations

import errno
import logging
import os

import attrs
import trio

from coordinator.config import Config

try:
    import resource
except ImportError:  # not on Windows: there is no such limit to check
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# accept(2) failing for want of resources; the connection waits in the backlog (trio's
# serve_listeners retries on the same ones).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
LOG_INTERVAL = 10.0
FIRST_WAIT = 0.1
LONGEST_WAIT = 1.0
# Descriptors besides connections: listening sockets, the event loop's, stdio, log
# files, Redis connections, the pins file, a worker thread's.
RESERVE = 64
# A hard limit of "unlimited" is raised to this much, not to infinity (which some
# systems refuse for descriptors).
UNLIMITED_TARGET = 1 << 20


def needed(config: Config) -> int:
    """The descriptors this configuration can hold open at once, before one per
    connected provider and per peer link (neither is bounded by a setting).

    ``max_connections`` consumer connections; provider sockets in the WebSocket
    handshake (``max_pending_providers``) and in admission (as many again, and as many
    again for providers proving their token in the upgrade request); with ``redis_url``,
    peer links in their handshake and before their hello (twice
    ``max_pending_providers``); and :data:`RESERVE`.
    """
    pending = 3 * config.max_pending_providers
    if config.redis_url:
        pending += 2 * config.max_pending_providers
    return config.max_connections + pending + RESERVE


@attrs.frozen
class Plan:
    """What to do about the limit: raise the soft limit to ``raise_to``, and/or warn."""

    raise_to: int | None
    short: bool  # even after raising, below what the configuration needs


def plan(soft: int, hard: int, need: int, unlimited: int) -> Plan:
    """Pure: raise a short soft limit as far as the hard one allows (all of it: providers
    come on top of ``need``); ``unlimited`` is how the system spells "no limit"."""
    if soft == unlimited or soft >= need:
        return Plan(None, False)
    target = UNLIMITED_TARGET if hard == unlimited else hard
    if target <= soft:
        return Plan(None, True)
    return Plan(target, target < need)


def check_limit(config: Config) -> None:
    """Raise the soft descriptor limit if the configuration needs more; warn once if
    it cannot be raised far enough."""
    if resource is None:
        return
    need = needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    decision = plan(soft, hard, need, resource.RLIM_INFINITY)
    target, short = decision.raise_to, decision.short
    if target is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("file descriptors: could not raise the limit from %d to %d: %s",
                        soft, target, exc)
            short = True
        else:
            log.info("file descriptors: limit raised from %d to %d (this configuration "
                     "holds up to %d open, plus one per provider)", soft, target, need)
            soft = target
    if short:
        log.warning(
            "file descriptors: the limit is %d, below the %d this configuration can hold "
            "open (max_connections %d, sockets in WebSocket handshake and admission %d, "
            "%d in reserve), before one per connected provider; beyond it connections "
            "wait. Raise the limit (ulimit -n, or LimitNOFILE= for systemd) to at least "
            "%d plus the fleet size, or lower max_connections",
            soft, need, config.max_connections, need - config.max_connections - RESERVE,
            RESERVE, need)


def _limit() -> str:
    if resource is None:
        return "unknown"
    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class AcceptErrors:
    """One listener's accept failures for want of resources: waited out, logged rarely."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.failures = 0  # in the current run of failures
        self._started: float | None = None
        self._logged_at = 0.0
        self._logged_failures = 0
        self._wait = FIRST_WAIT

    async def failed(self, exc: OSError) -> None:
        """``exc`` came from ``accept``: re-raised unless it is for want of resources;
        else logged (rarely) and waited out before the caller tries again."""
        if exc.errno not in CAPACITY_ERRNOS:
            raise exc
        now = trio.current_time()
        self.failures += 1
        if self._started is None:
            self._started = self._logged_at = now
            self._logged_failures = 1
            log.error("%s listener: accept failed with %s (%s); connections wait in the "
                      "backlog, retrying (descriptor limit %s; docs/operations.md, file "
                      "descriptors)", self.listener, errno.errorcode.get(exc.errno or 0, "?"),
                      os.strerror(exc.errno or 0), _limit())
        elif now - self._logged_at >= LOG_INTERVAL:
            log.error("%s listener: accept still failing (%s): %d failures in the last %.0fs",
                      self.listener, errno.errorcode.get(exc.errno or 0, "?"),
                      self.failures - self._logged_failures, now - self._logged_at)
            self._logged_at, self._logged_failures = now, self.failures
        await trio.sleep(self._wait)
        self._wait = min(self._wait * 2, LONGEST_WAIT)

    def recovered(self) -> None:
        """An accept succeeded: a run of failures, if any, is over."""
        if self._started is not None:
            log.warning("%s listener: accepting again after %d failures over %.1fs",
                        self.listener, self.failures, trio.current_time() - self._started)
            self._started = None
            self.failures = 0
            self._wait = FIRST_WAIT
