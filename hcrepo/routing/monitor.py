"""The background thread that probes every node at a jittered interval and keeps the facts of
hcrepo.routing.health fresh: lag, role, latency, breaker trials and pool leaks."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

import psycopg

from hcrepo.config import Settings
from hcrepo.ops.counters import Counter
from hcrepo.phi.logs import logger
from hcrepo.routing.health import Probe, ProbeBusy, WalHistory, describe_error
from hcrepo.routing.node import Node


class HealthMonitor:
    """Probes every node at a jittered interval; see hcrepo.routing.health for the lag rules."""

    def __init__(
        self,
        primary: Node,
        replicas: Sequence[Node],
        settings: Settings,
        on_cycle: Callable[[], None],
    ) -> None:
        self._primary = primary
        self._replicas = tuple(replicas)
        self._settings = settings
        self._on_cycle = on_cycle
        self.history = WalHistory()
        self.cycles = Counter()
        self._cycle_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hcrepo-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wake(self) -> None:
        """Run the next cycle now (a node just failed, or a caller wants fresh facts)."""
        self._wake.set()

    def check_now(self) -> None:
        """One full cycle in the calling thread (open() and tests)."""
        with self._cycle_lock:
            self._check(self._primary)
            if self._primary.health.up:
                self.history.add(self._primary.health.lsn_at, self._primary.health.lsn)
            for replica in self._replicas:
                probe = self._check(replica)
                if probe is not None:
                    replica.health.assess(
                        probe, self.history, time.monotonic(),
                        max_bytes=self._settings.max_lag_bytes,
                        max_seconds=self._settings.max_lag_seconds,
                    )
            for node in (self._primary, *self._replicas):
                node.check_leaks(self._settings.pool_leak_threshold)
            self._on_cycle()
            self.cycles.inc()

    def _check(self, node: Node) -> Probe | None:
        asked = time.monotonic()
        try:
            probe = node.health.probe()
        except ProbeBusy:
            return None
        except (psycopg.Error, OSError) as exc:
            node.health.down(exc, asked)
            node.failed(f"health probe: {describe_error(exc)}")
            return None
        node.health.observe(probe, asked)
        node.verify_role(in_recovery=probe.in_recovery, started_at=probe.started_at)
        node.probe_succeeded(self._settings.health_timeout)
        return probe

    def _run(self) -> None:
        interval = self._settings.health_interval
        while not self._stop.is_set():
            try:
                self.check_now()
            except Exception:
                # The monitor must outlive any surprise; routing keeps its last facts.
                logger.exception("hcrepo health cycle failed")
            self._wake.wait(interval * random.uniform(0.8, 1.2))
            self._wake.clear()
