"""Riding out Redis being away: which errors mean that, and how long to wait before trying again.

A Redis restart or a network blip is not any job's fault, so a worker that meets one keeps
its jobs and tries again: ``ConnectionError`` (refused, reset, ``LOADING`` while Redis
replays its AOF) and ``TimeoutError`` are "Redis is away"; every other ``RedisError`` is an
answer from a Redis that is up. The wait starts short and doubles, capped at
``Settings.redis_retry_max_wait``, so a worker takes jobs again within that many seconds of
Redis coming back (RQ's own loop doubles up to 60 s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

AWAY = (redis.ConnectionError, redis.TimeoutError)
FIRST_WAIT = 0.1  # seconds

log = logging.getLogger("audioq.worker")


class Backoff:
    """Capped doubling waits while Redis is away; one log line when it goes and one when it is back."""

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self.wait = 0.0
        self.away_since: float | None = None

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def failed(self, exc: BaseException, doing: str) -> float:
        """Note that Redis was away while ``doing``; returns the seconds to wait before the next try."""
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("Redis is away (%s: %s) while %s; keeping the jobs held and retrying every %g s at most",
                        type(exc).__name__, exc, doing, self.max_wait)
        self.wait = min(self.max_wait, max(FIRST_WAIT, 2 * self.wait))
        return self.wait

    def succeeded(self) -> None:
        if self.away_since is not None:
            log.warning("Redis is back after %.1f s", time.monotonic() - self.away_since)
        self.away_since, self.wait = None, 0.0

    def retry(self, action, doing: str, give_up: Callable[[], bool] = lambda: False):
        """Run ``action`` until Redis answers it, waiting between tries; returns its value.

        ``give_up()`` true after a try that met Redis away: that error is raised (a cold shutdown
        does not wait for Redis)."""
        while True:
            try:
                value = action()
            except AWAY as exc:
                if give_up():
                    raise
                time.sleep(self.failed(exc, doing))
                continue
            self.succeeded()
            return value
