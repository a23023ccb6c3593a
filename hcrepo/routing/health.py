"""What hcrepo knows about each database node (hcrepo.routing.monitor keeps it fresh).

Every node has a tiny probe pool of its own (two connections at most: one for the monitor, one
for an on-demand replay-position refresh), so a probe never waits behind application traffic
and an exhausted application pool cannot hide a healthy node. Probe connections carry a short
`statement_timeout`; one probe is one round trip.

Replication lag is judged two ways, like GitLab's load balancer, but a replica is excluded when
either is over its maximum:

- bytes: the primary's WAL position minus the replica's replay position;
- seconds: how long ago the replica was last known to be fully up to date. Both bounds used
  are upper bounds of the true staleness, so the smaller one is taken: `now -
  pg_last_xact_replay_timestamp()` (exact under steady writes, but it grows without end while
  the primary is idle), and the time since the primary was last seen at a WAL position the
  replica has replayed (the monitor keeps a short history of primary positions). A replica
  whose replay position has reached the primary's is not lagging at all, however long the
  primary has been idle.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from hcrepo.config import connect_failure, server_options
from hcrepo.ops.counters import Counter
from hcrepo.routing.consistency import parse_lsn

PROBE_POOL_SIZE = 2
# Samples of the primary's WAL position kept for the seconds-lag bound (one per probe).
_HISTORY = 512
# Weight of the newest probe round trip in the latency average.
_LATENCY_WEIGHT = 0.3

_PROBE_SQL = (
    "/* hcrepo:health */ SELECT pg_is_in_recovery(), "
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
    "ELSE pg_current_wal_lsn() END)::text, "
    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, "
    "pg_postmaster_start_time()"
)
_REPLAY_SQL = "/* hcrepo:replay_lsn */ SELECT pg_last_wal_replay_lsn()::text"


class ProbeBusy(Exception):
    """Both probe connections of a node are in use (internal: the probe is skipped)."""


class ProbePool:
    """At most `PROBE_POOL_SIZE` autocommit connections to one node, for probes only."""

    def __init__(self, url: str, timeout: float, *, warm_up: str) -> None:
        self._url = url
        self._warm_up = warm_up
        self._timeout = timeout
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            # libpq's connect_timeout is whole seconds, and at least 2.
            "connect_timeout": max(2, math.ceil(timeout)),
            "options": server_options(url, statement_timeout=max(1, int(timeout * 1000))),
            "application_name": "hcrepo-health",
        }
        self._idle: list[psycopg.Connection[Any]] = []
        self._slots = threading.BoundedSemaphore(PROBE_POOL_SIZE)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self._timeout):
            raise ProbeBusy
        conn = None
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = psycopg.connect(self._url, **self._connect_kwargs)
                # A new backend's first query loads its catalog caches: keep that out of
                # the latency the probes measure.
                conn.execute(self._warm_up)
            yield conn
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        else:
            self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def forget(self) -> list[Any]:
        """After fork: drop the parent's sockets unclosed; return them to be kept referenced."""
        inherited: list[Any] = list(self._idle)
        self._idle = []
        self._slots = threading.BoundedSemaphore(PROBE_POOL_SIZE)
        return inherited


class Probe(NamedTuple):
    in_recovery: bool
    lsn: int  # replay position of a standby, current WAL position of a primary
    replay_age: float | None  # seconds since the last replayed commit (standby only)
    started_at: datetime
    latency: float  # seconds, the probe's round trip


class NodeHealth:
    """The latest facts about one node. Fields are plain attributes: routing reads them
    without a lock, and a stale read only ever makes routing more conservative."""

    def __init__(self, url: str, timeout: float) -> None:
        self.probes = ProbePool(url, timeout, warm_up=_PROBE_SQL)
        self._url = url
        self.up: bool | None = None  # None until the first probe
        self.role_ok = True
        self.started_at: datetime | None = None
        self.lsn = 0
        self.lsn_at = -math.inf  # monotonic time the LSN was read (before the query was sent)
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.lagging = False
        self.latency: float | None = None
        self.error: str | None = None
        # libpq's own account of a failure to reach or log in, one line, no password.
        self.reason: str | None = None
        self.refreshes = Counter()
        self._refreshing = threading.Lock()

    def probe(self) -> Probe:
        """One round trip on a probe connection; raises psycopg.Error, OSError or ProbeBusy."""
        with self.probes.connection() as conn:
            sent = time.perf_counter()
            row = conn.execute(_PROBE_SQL).fetchone()
            latency = time.perf_counter() - sent
        assert row is not None  # a SELECT without FROM returns one row
        in_recovery, lsn, replay_age, started_at = row
        return Probe(bool(in_recovery), parse_lsn(lsn) if lsn else 0, replay_age, started_at,
                     latency)

    def observe(self, probe: Probe, at: float) -> None:
        self.up = True
        self.error = self.reason = None
        self.lsn, self.lsn_at = probe.lsn, at
        previous = self.latency
        self.latency = probe.latency if previous is None else (
            previous + _LATENCY_WEIGHT * (probe.latency - previous)
        )

    def down(self, error: BaseException, at: float) -> None:
        self.up = False
        self.error = describe_error(error)
        # Without a SQLSTATE the message is libpq's (reaching, logging in), never a
        # statement's, so it holds no value.
        self.reason = None
        if isinstance(error, psycopg.OperationalError) and error.sqlstate is None:
            self.reason = connect_failure(error, self._url)
        self.forget_replay()

    def forget_replay(self) -> None:
        """A restarted standby may come back behind what it had replayed: trust nothing."""
        self.lsn, self.lsn_at = 0, -math.inf

    def caught_up(self, lsn: int, max_age: float) -> bool:
        """Whether this standby has replayed `lsn`, by the cached position when that answers.

        A cached position older than `max_age` that is not far enough is refreshed with one
        round trip; one caller refreshes at a time and the others do not wait for it.
        """
        if self.lsn >= lsn:
            return True
        if time.monotonic() - self.lsn_at < max_age or not self._refreshing.acquire(
            blocking=False
        ):
            return False
        try:
            asked = time.monotonic()
            with self.probes.connection() as conn:
                row = conn.execute(_REPLAY_SQL).fetchone()
            replayed = parse_lsn(row[0]) if row and row[0] else 0
        except (psycopg.Error, OSError, ProbeBusy):
            return False
        finally:
            self._refreshing.release()
        self.refreshes.inc()
        if asked > self.lsn_at:
            self.lsn, self.lsn_at = replayed, asked
        return replayed >= lsn

    def assess(
        self,
        probe: Probe,
        primary: WalHistory,
        now: float,
        *,
        max_bytes: int,
        max_seconds: float,
    ) -> None:
        """Set this standby's lag from its probe and what the primary was seen at."""
        head = primary.head
        if head is not None and probe.lsn >= head:
            self.lag_bytes, self.lag_seconds = 0, 0.0
        else:
            self.lag_bytes = None if head is None else head - probe.lsn
            bounds = [age for age in (probe.replay_age, primary.since(probe.lsn, now))
                      if age is not None]
            self.lag_seconds = max(0.0, min(bounds)) if bounds else None
        self.lagging = (
            (self.lag_bytes is not None and self.lag_bytes > max_bytes)
            or self.lag_seconds is None
            or self.lag_seconds > max_seconds
        )

    def refresh_lock_reset(self) -> None:
        """After fork: a lock held by a parent thread would never be released here."""
        self._refreshing = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "role_ok": self.role_ok,
            "lsn": self.lsn,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": self.lag_seconds,
            "lagging": self.lagging,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
            "error": self.error,
            "reason": self.reason,
            "replay_refreshes": self.refreshes.value,
        }


class WalHistory:
    """Recent (monotonic time, WAL position) samples of the primary."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=_HISTORY)

    @property
    def head(self) -> int | None:
        samples = self._samples
        return samples[-1][1] if samples else None

    def add(self, at: float, lsn: int) -> None:
        self._samples.append((at, lsn))

    def since(self, replayed: int, now: float) -> float | None:
        """Seconds since the primary was last seen at or before `replayed`; None if never."""
        for at, lsn in reversed(self._samples):
            if lsn <= replayed:
                return now - at
        return None


def describe_error(error: BaseException) -> str:
    """A PHI-free description: the class and SQLSTATE, never the server's message."""
    sqlstate = getattr(error, "sqlstate", None)
    return type(error).__name__ + (f" ({sqlstate})" if sqlstate else "")
