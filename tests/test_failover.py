"""Failover against real servers: a replica crashes under a load of 8 reader threads, and a
hot-standby conflict cancels a replica read. Callers must see no error either way."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from hcrepo.ops.breaker import BreakerState
from hcrepo.testing import free_port
from tests.support.routing import DBNAME, Cluster, LogSink, Routing, ports, until

THREADS = 8


class Load:
    """THREADS readers in a loop until stopped; counts by phase, failures kept."""

    def __init__(self, read: Any, victim_port: int) -> None:
        self._read = read
        self._victim = victim_port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._barrier = threading.Barrier(THREADS + 1)
        self.phase = "before"
        self.attempted = 0
        self.failures: list[str] = []
        self.served: dict[str, Counter[int]] = {}
        self._milestones: list[tuple[str, int, threading.Event]] = []
        self._threads = [threading.Thread(target=self._work) for _ in range(THREADS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._barrier.wait(30)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def after(self, reads: int) -> threading.Event:
        """Set once `reads` more reads have succeeded in the current phase."""
        event = threading.Event()
        with self._lock:
            done = sum(self.served.get(self.phase, Counter()).values())
            self._milestones.append((self.phase, done + reads, event))
        return event

    def victim_serves(self) -> threading.Event:
        """Set once the victim answers a read in the current phase."""
        event = threading.Event()
        with self._lock:
            self._milestones.append((self.phase, -self._victim, event))
        return event

    def enter(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def _work(self) -> None:
        self._barrier.wait(30)
        while not self._stop.is_set():
            try:
                port = self._read()  # a thread of its own: no read-your-writes position
            except Exception as exc:
                with self._lock:
                    self.attempted += 1
                    self.failures.append(f"{self.phase}: {exc!r}")
                continue
            with self._lock:
                self.attempted += 1
                served = self.served.setdefault(self.phase, Counter())
                served[port] += 1
                total = sum(served.values())
                for phase, goal, event in self._milestones:
                    if phase == self.phase and (goal == -port or 0 < goal <= total):
                        event.set()


def test_replica_crash_under_load_fails_no_read(
    cluster: Cluster, log_sink: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    logs: LogSink = log_sink("INFO")
    db = cluster.database(
        health_interval=0.05, breaker_failures=3, breaker_reset=0.2, health_timeout=1.0,
        pool_min=2, pool_max=THREADS + 2, pool_acquire_timeout=2.0,
    )
    victim = cluster.replicas[0]
    node = db._router.replicas[0]
    opened = logs.event(f"circuit breaker of replica1 ({node.address}) opened")
    closed = logs.event(f"circuit breaker of replica1 ({node.address}) closed")
    load = Load(Routing(db).where_am_i, victim.port)
    load.start()
    try:
        assert load.after(200).wait(30), "the load did not get going"
        assert load.served["before"][victim.port] > 0
        load.enter("stopping")
        stopped_at = time.monotonic()
        victim.stop(mode="immediate")
        load.enter("down")
        assert opened.wait(30), "the breaker did not open"
        opened_after = time.monotonic() - stopped_at
        assert node.breaker.state is not BreakerState.CLOSED
        assert load.after(200).wait(30), "reads stalled while the replica was down"

        victim.start()
        load.enter("restarted")
        restarted_at = time.monotonic()
        returned = load.victim_serves()
        assert closed.wait(30), "the breaker did not close after the restart"
        closed_after = time.monotonic() - restarted_at
        assert returned.wait(30), "no read went back to the restarted replica"
        back_after = time.monotonic() - restarted_at
    finally:
        load.stop()
        if not victim.is_running():
            victim.start()
        cluster.wait_replayed(victim)

    stats = db._router.stats()
    figures = (
        f"failover figures: reads attempted {load.attempted} ("
        f"{sum(load.served.get('down', Counter()).values())} while the replica was down), "
        f"reads failed {len(load.failures)}, failovers {stats['failovers']}, breaker opened "
        f"{opened_after:.3f}s after the crash, closed {closed_after:.3f}s after the restart, "
        f"first read on the restarted replica {back_after:.3f}s after it"
    )
    with capsys.disabled():
        print("\n" + figures)
    assert load.failures == []
    assert load.attempted > 400
    assert stats["failovers"] >= 1
    assert load.served["down"][victim.port] == 0
    assert load.served["restarted"][victim.port] > 0


def test_hot_standby_conflict_is_retried_on_another_node(cluster: Cluster) -> None:
    victim, other = cluster.replicas
    with cluster.superuser(victim) as conn:
        conn.execute("ALTER SYSTEM SET max_standby_streaming_delay = 0")  # cancel at once
        conn.execute("SELECT pg_reload_conf()")
        until(lambda: _setting(cluster, victim, "max_standby_streaming_delay") == "0",
              "the replica to reload its configuration")
    try:
        db = cluster.database(routing_policy="round_robin")
        answers: list[Any] = []
        reader = threading.Thread(
            # Long enough that the replayed lock always meets it running, on a loaded machine.
            target=lambda: answers.append(Routing(db).slow_where_am_i(seconds=2.0))
        )
        reader.start()  # the first round-robin turn is replica1, the victim

        def reading() -> bool:
            with cluster.superuser(victim) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query LIKE '%hcrepo:slow_where_am_i%' AND state = 'active'"
                ).fetchone()
            return bool(row and row[0])

        until(reading, "the slow read to start on replica1")
        with cluster.superuser(cluster.primary) as conn, conn.transaction():
            # Replayed on the standby, this lock conflicts with the running read.
            conn.execute("LOCK TABLE routing_items IN ACCESS EXCLUSIVE MODE")
        reader.join(30)
        assert answers == [other.port]
        stats = db._router.stats()
        assert (stats["conflicts"], stats["failovers"]) == (1, 1)
    finally:
        with cluster.superuser(victim) as conn:
            conn.execute("ALTER SYSTEM RESET max_standby_streaming_delay")
            conn.execute("SELECT pg_reload_conf()")
        cluster.catch_up()


def _setting(cluster: Cluster, server: Any, name: str) -> str:
    with cluster.superuser(server) as conn:
        row = conn.execute("SELECT current_setting(%s)", [name]).fetchone()
    return str(row[0]) if row else ""


def test_replica_unreachable_at_open_is_skipped_from_the_first_read(
    cluster: Cluster, log_sink: Any
) -> None:
    logs: LogSink = log_sink("WARNING")
    nowhere = f"postgresql://postgres:x@127.0.0.1:{free_port()}/{DBNAME}"
    db = cluster.database(read_replica_urls=[nowhere, cluster.replica_urls[1]],
                          pool_acquire_timeout=5.0)
    health = db.health()["nodes"]["replica1"]
    assert health["up"] is False and health["error"] == "OperationalError"
    assert logs.matching("replica1 taken out of read rotation (probe failed")
    began = time.monotonic()
    assert set(ports(db, 10)) == {cluster.replicas[1].port}
    assert time.monotonic() - began < 2.0  # nobody waited for the dead replica's pool
    assert db._router.replicas[0]._pool is None

