"""Which server answers: the primary for writes and units of work, a replica for plain reads.

A read goes to a routable replica (breaker closed, role verified, lag within both maximums)
chosen by HCREPO_ROUTING_POLICY; if the caller's block carries a read-your-writes position,
only to one that has replayed it (`hcrepo.routing.consistency`), else to the primary. A read
that fails on a replica — connection lost, pool exhausted, or cancelled by a hot-standby
conflict — is retried in the same call on the next replica and finally on the primary: the
caller sees no error.
With replicas configured but none routable, reads go to the primary; that degraded state is
logged once when it starts and once when it ends, and counted.

Nothing on the read path takes a lock: the routable set is an immutable tuple swapped by the
health monitor and breaker transitions, and counters are lock-free.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hcrepo.config import RoutingPolicy, Settings
from hcrepo.errors import ConfigError, ConnectionLost, DatabaseError, HcrepoError, PoolTimeout
from hcrepo.ops import metrics
from hcrepo.ops.breaker import CLOSED
from hcrepo.ops.counters import Counters
from hcrepo.phi.logs import logger
from hcrepo.pipeline import HcConnection
from hcrepo.routing.monitor import HealthMonitor
from hcrepo.routing.node import Node, address

R = TypeVar("R")

# Hot-standby conflicts ("canceling statement due to conflict with recovery"): serialization
# failure for snapshot/lock/pin conflicts, deadlock for buffer-pin deadlocks, database dropped.
# Serializable transactions cannot run on a standby, so on a replica these mean a conflict.
RECOVERY_CONFLICT = frozenset({"40001", "40P01", "57P04"})
_FAILED = object()
# lowest_latency spreads reads over replicas whose latency is this close to the best one.
_LATENCY_SLACK = 1.25
_LATENCY_FLOOR = 0.0001

_EVENTS = (
    "failovers",  # a replica failed a read that another node then served
    "conflicts",  # of those, hot-standby conflicts
    "primary_for_token",  # no routable replica had replayed the caller's position yet
    "primary_degraded",  # replicas are configured but none is routable
    "degraded_episodes",
)


class Router:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.primary = Node("primary", settings.database_url, settings, is_primary=True,
                            on_change=self._refresh)
        self.replicas = [
            Node(f"replica{i}", url, settings, is_primary=False, on_change=self._refresh)
            for i, url in enumerate(settings.read_replica_urls, start=1)
        ]
        # Read-your-writes positions are per cluster: the primary's host and port.
        self.cluster = address(settings.database_url).rpartition("/")[0]
        self.counters = Counters(*_EVENTS)
        self._policy = settings.routing_policy
        self._max_lsn_age = settings.replay_cache_max_age
        self._turn = itertools.count()
        self._routable: tuple[Node, ...] = tuple(self.replicas)  # optimistic until probed
        self._degraded = False
        self._lock = threading.Lock()
        self._monitor: HealthMonitor | None = None
        self._closed = False
        _routers.add(self)

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Log in to every node once, fill the primary's pool, probe every node once (roles,
        lag), start the monitor; each step within DB_CONNECT_TIMEOUT.

        `ConfigError` naming DATABASE_URL, with the server's reason in one line and no
        password, when the primary cannot be logged into (wrong password, unknown host,
        missing database, nothing listening), and naming the setting of any node whose role
        is a superuser or has BYPASSRLS. A replica that cannot be logged into is skipped,
        whatever the reason, and the primary takes its reads: libpq reports a failed login
        without a SQLSTATE, so a replica that is down and one that refuses the password are
        told apart only by a message the server may translate, and a replica is spare
        capacity whose failure must not stop the primary from serving. Its probe failure
        is logged once, and the monitor keeps probing: it joins once it answers. Replicas
        are tried within HCREPO_HEALTH_TIMEOUT, like their probes.
        """
        self._closed = False
        settings = self._settings
        failure = self.primary.admit(settings.db_connect_timeout)
        if failure is not None:
            raise ConfigError(self.primary.setting, f"cannot connect: {failure}")
        for replica in self.replicas:
            replica.admit(settings.health_timeout)  # a failed login: the probe reports it
        self.primary.open(settings.db_connect_timeout)
        self.monitor.check_now()

    def _ensure_monitor(self) -> HealthMonitor | None:
        """The running monitor, started on first use; None once the router is closed."""
        with self._lock:
            if self._monitor is None and not self._closed:
                self._monitor = HealthMonitor(self.primary, self.replicas, self._settings,
                                              on_cycle=self._refresh)
                self._monitor.start()
            return self._monitor

    @property
    def monitor(self) -> HealthMonitor:
        monitor = self._ensure_monitor()
        if monitor is None:
            raise HcrepoError("the router is closed")
        return monitor

    def close(self) -> None:
        with self._lock:
            self._closed = True
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
        for node in (self.primary, *self.replicas):
            node.close()

    # -- routing -------------------------------------------------------------------------

    def reader(self, need: int) -> Node:
        """The node a read that cannot fail over (a stream) should use now; `need` is the
        replay position it must see (`consistency.replay_needed`, 0 for none)."""
        if self._monitor is None:
            self._ensure_monitor()
        return next(self._candidates(need, self._routable))

    def read(self, attempt: Callable[[HcConnection], R], need: int) -> R:
        """Run the idempotent read `attempt(conn)` on a node that has replayed `need`,
        failing over as the module describes.

        When even the primary lost the connection (a restart leaves dead sockets in the
        pool), its idle connections are checked and the read runs once more.
        """
        try:
            return self._read(attempt, need)
        except ConnectionLost:
            self.primary.pool.check()
        try:
            return self._read(attempt, need)
        except ConnectionLost as error:
            self.primary.explain_lost(error)
            raise

    def _read(self, attempt: Callable[[HcConnection], R], need: int) -> R:
        if self._monitor is None:
            self._ensure_monitor()
        if not self.replicas:
            # Nothing to choose; on the primary `_attempt` raises rather than returning _FAILED.
            return self._attempt(self.primary, attempt)  # type: ignore[return-value]
        routable = self._routable
        if not routable:
            return self._failover(attempt, need, routable)
        # The common case, kept short: one pick, one try, no generator.
        node = self._pick(routable)
        if node.breaker.state is not CLOSED or (
            need and not node.health.caught_up(need, self._max_lsn_age)
        ):
            return self._failover(attempt, need, routable, first=node)
        outcome = self._attempt(node, attempt)
        if outcome is not _FAILED:
            return outcome  # type: ignore[return-value]
        self.counters.inc("failovers")
        return self._failover(attempt, need, routable, first=node, failed=node)

    def _attempt(self, node: Node, attempt: Callable[[HcConnection], R]) -> R | object:
        """`attempt` on `node`; `_FAILED` when another node should take the read instead.
        On the primary, the last resort, every error propagates."""
        replica = node is not self.primary
        try:
            conn = node.acquire(depth=2, held_in_frame=True, explain=not replica)
        except (PoolTimeout, ConnectionLost):
            self._wake_monitor()  # busy or unreachable: let a probe tell which, now
            if replica:
                return _FAILED
            raise
        try:
            result = attempt(conn)
        except ConnectionLost as exc:
            if exc.sqlstate not in RECOVERY_CONFLICT:
                node.failed(f"read lost its connection ({exc.sqlstate or 'no sqlstate'})")
                self._wake_monitor()
            if replica:
                return _FAILED
            raise
        except DatabaseError as exc:
            if replica and exc.sqlstate in RECOVERY_CONFLICT:
                self.counters.inc("conflicts")
                return _FAILED
            raise
        finally:
            node.release(conn)
        node.succeeded()
        node.served.inc()
        return result

    def _failover(
        self,
        attempt: Callable[[HcConnection], R],
        need: int,
        routable: tuple[Node, ...],
        *,
        first: Node | None = None,
        failed: Node | None = None,
    ) -> R:
        for node in self._candidates(need, routable, first=first, failed=failed):
            outcome = self._attempt(node, attempt)
            if outcome is not _FAILED:
                return outcome  # type: ignore[return-value]
            self.counters.inc("failovers")
        raise AssertionError("unreachable: the primary is always the last candidate")

    def _candidates(
        self,
        need: int,
        routable: tuple[Node, ...],
        *,
        first: Node | None = None,
        failed: Node | None = None,
    ) -> Iterator[Node]:
        """Routable replicas fit for `need`, `first` (else the policy's pick) first, then
        the primary. `failed` is a replica this read already tried."""
        if not routable:
            if self.replicas:
                self.counters.inc("primary_degraded")
            yield self.primary
            return
        first = first or self._pick(routable)
        order = routable if first is routable[0] else (
            first, *(node for node in routable if node is not first)
        )
        behind = False
        offered = failed is not None
        for node in order:
            if node is failed or node.breaker.state is not CLOSED:
                continue
            if need and not node.health.caught_up(need, self._max_lsn_age):
                behind = True
                continue
            offered = True
            yield node
        if behind and not offered:
            self.counters.inc("primary_for_token")
        yield self.primary

    def _wake_monitor(self) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.wake()

    def _pick(self, routable: tuple[Node, ...]) -> Node:
        count = len(routable)
        if count == 1:
            return routable[0]
        turn = next(self._turn)
        policy = self._policy
        if policy is RoutingPolicy.ROUND_ROBIN:
            return routable[turn % count]
        if policy is RoutingPolicy.LEAST_BUSY:
            # Fewest connections checked out; ties rotate so equals share the load.
            best = routable[turn % count]
            for offset in range(1, count):
                node = routable[(turn + offset) % count]
                if node.in_use < best.in_use:
                    best = node
            return best
        latencies = [node.health.latency for node in routable]
        known = [latency for latency in latencies if latency is not None]
        limit = min(known) * _LATENCY_SLACK + _LATENCY_FLOOR if known else 0.0
        near = [node for node, latency in zip(routable, latencies, strict=True)
                if latency is None or latency <= limit]
        return near[turn % len(near)]

    def _refresh(self) -> None:
        """Recompute the routable replicas (monitor cycle, breaker or role change); log each
        replica leaving or rejoining the rotation, and the degraded state, once per change."""
        with self._lock:
            before = self._routable
            after = tuple(node for node in self.replicas if node.routable)
            self._routable = after
            degraded = bool(self.replicas) and not after
            was_degraded, self._degraded = self._degraded, degraded
        for node in self.replicas:
            if node in before and node not in after:
                logger.warning("hcrepo: {} taken out of read rotation ({})", node.name,
                               _why_not(node))
            elif node in after and node not in before:
                logger.info("hcrepo: {} back in read rotation", node.name)
        if degraded and not was_degraded:
            self.counters.inc("degraded_episodes")
            logger.warning("hcrepo: no routable replica ({}): reads go to the primary",
                           "; ".join(f"{node.name}: {_why_not(node)}" for node in self.replicas))
        elif was_degraded and not degraded:
            logger.info("hcrepo: replica reads resumed ({})",
                        ", ".join(node.name for node in after))

    # -- introspection -------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._degraded

    def stats(self) -> dict[str, Any]:
        """Counters and per-node state; nothing here can carry PHI."""
        return {
            **self.counters.snapshot(),
            "degraded": self._degraded,
            "routable": [node.name for node in self._routable],
            "nodes": {node.name: node.snapshot() for node in (self.primary, *self.replicas)},
        }

    def _after_fork(self) -> None:
        # The parent's monitor thread does not exist here; a new one starts on first use.
        self._lock = threading.Lock()
        self._monitor = None


def _why_not(node: Node) -> str:
    health = node.health
    if node.breaker.state is not CLOSED:
        return f"breaker {node.breaker.state}"
    if health.up is False:
        return f"probe failed: {health.error}" + (f": {health.reason}" if health.reason else "")
    if not health.role_ok:
        return "not a standby"
    seconds = "unknown" if health.lag_seconds is None else f"{health.lag_seconds:.2f}"
    return f"lag {health.lag_bytes} bytes, {seconds} s"


_routers: weakref.WeakSet[Router] = weakref.WeakSet()


def _forget_parent_monitors() -> None:
    for router in list(_routers):
        router._after_fork()


os.register_at_fork(after_in_child=_forget_parent_monitors)


class _RoutingCollector(Collector):
    """Prometheus view of every live router, read at scrape time (nothing on the hot path).

    Two routers on one cluster (two `Database`s in a process) add up into one series.
    """

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        served: dict[tuple[str, str], float] = {}
        events: dict[tuple[str, str], float] = {}
        gauges: dict[str, dict[tuple[str, str], float]] = {
            "lag_bytes": {}, "lag_seconds": {}, "routable": {}, "in_use": {},
        }
        for router in list(_routers):
            for name, count in router.counters.snapshot().items():
                key = (router.cluster, name)
                events[key] = events.get(key, 0.0) + count
            for node in (router.primary, *router.replicas):
                key = (router.cluster, node.name)
                served[key] = served.get(key, 0.0) + node.served.value
                gauges["in_use"][key] = gauges["in_use"].get(key, 0.0) + node.in_use
                gauges["routable"][key] = 1.0 if node.is_primary or node.routable else 0.0
                if node.health.lag_bytes is not None:
                    gauges["lag_bytes"][key] = node.health.lag_bytes
                if node.health.lag_seconds is not None:
                    gauges["lag_seconds"][key] = node.health.lag_seconds
        labels = ["cluster", "node"]
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily("hcrepo_routing_reads", "Reads served, by node", labels=labels),
            CounterMetricFamily("hcrepo_routing_events", "Failovers, hot-standby conflicts, "
                                "reads sent to the primary and why, degraded episodes",
                                labels=["cluster", "event"]),
            GaugeMetricFamily("hcrepo_replica_lag_bytes", "Replay lag in bytes", labels=labels),
            GaugeMetricFamily("hcrepo_replica_lag_seconds", "Replay lag in seconds (upper "
                              "bound)", labels=labels),
            GaugeMetricFamily("hcrepo_node_routable", "1 when reads may go to the node",
                              labels=labels),
            GaugeMetricFamily("hcrepo_pool_in_use", "Connections checked out", labels=labels),
        ]
        samples = [served, events, gauges["lag_bytes"], gauges["lag_seconds"],
                   gauges["routable"], gauges["in_use"]]
        for family, values in zip(families, samples, strict=True):
            for key, value in values.items():
                family.add_metric(list(key), value)
        yield from families


metrics.REGISTRY.register(_RoutingCollector())
