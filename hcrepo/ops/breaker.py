"""A circuit breaker for one dependency (a Redis client, a database node).

Closed: calls go through. After `failures` consecutive failures it opens: calls are refused
without touching the dependency. After `reset` seconds one caller at a time is let through as
a probe (half-open); its success closes the breaker, its failure opens it for another `reset`.

The lock guards a few field updates only and is never held while the protected call runs,
so callers are not serialized through the breaker (pybreaker's global lock is the trap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Compared with `is` on the read path, where a module global is the cheapest lookup.
CLOSED = BreakerState.CLOSED


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int,
        reset: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or reset <= 0:
            raise ValueError("failures must be >= 1 and reset > 0")
        self._threshold = failures
        self._reset = reset
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_until = 0.0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._reset:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allow(self) -> bool:
        """Whether this call may use the dependency (closed, or it is the half-open probe)."""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if now - self._opened_at < self._reset or now < self._probe_until:
                return False
            # One probe per reset period: a probe that never reports frees the slot again.
            self._probe_until = now + self._reset
            return True

    def success(self) -> bool:
        """Record a successful call; True when it closed an open breaker.

        While open (before `reset` has passed) a success is a straggler that started before
        the failures and proves nothing: only a success in the half-open period closes it.
        """
        if self._opened_at is None and self._failures == 0:
            return False
        with self._lock:
            if self._opened_at is not None and self._clock() - self._opened_at < self._reset:
                return False
            recovered = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            self._probe_until = 0.0
            return recovered

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened a closed breaker."""
        with self._lock:
            self._failures += 1
            if self._opened_at is not None:
                self._opened_at = self._clock()  # a failed probe: wait another period
                self._probe_until = 0.0
                return False
            if self._failures >= self._threshold:
                self._opened_at = self._clock()
                return True
            return False
