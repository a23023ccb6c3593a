"""Routing against a real primary and two real streaming replicas: where reads and writes go,
read-your-writes with replay paused, lag in bytes and in seconds, misconfigured roles, the
degraded state, the routing policies, and the routing settings."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest

from hcrepo import ConfigError, Database, InvalidToken, Settings
from hcrepo.ops import metrics
from hcrepo.routing.consistency import format_lsn, parse_lsn
from tests.support.routing import (
    Cluster,
    Found,
    LogSink,
    Routing,
    SlowRelay,
    pool_settled,
    ports,
    until,
)
from tests.support.wire import Relay


def writer(db: Database) -> Any:
    """A context that may write (writes need an actor)."""
    return db.context(actor_id=uuid.uuid4())


# --- where reads and writes go ---------------------------------------------------------------


def test_plain_reads_go_to_replicas_and_writes_to_the_primary(cluster: Cluster) -> None:
    db = cluster.database()
    served = ports(db, 20)
    assert set(served) == {replica.port for replica in cluster.replicas}
    with writer(db):
        new_id = Routing(db).add_note(note="written")
    with cluster.superuser(cluster.primary) as conn:
        row = conn.execute("SELECT note FROM routing_items WHERE id = %s", [new_id]).fetchone()
    assert row == ("written",)
    assert db._router.stats()["nodes"]["primary"]["served"] == 0


def test_pools_open_lazily(cluster: Cluster) -> None:
    db = Database(cluster.settings())
    try:
        router = db._router
        assert all(node._pool is None for node in (router.primary, *router.replicas))
        Routing(db).where_am_i()
        assert router.primary._pool is None  # a read needed no primary connection
        assert sum(node._pool is not None for node in router.replicas) == 1
    finally:
        db.close()


def test_replica_pools_refuse_writes(cluster: Cluster) -> None:
    db = cluster.database()
    with db._router.replicas[0].connection() as conn:
        row = conn.execute("SHOW default_transaction_read_only").fetchone()
    assert row == ("on",)


def test_health_and_prometheus_show_the_routing_state(cluster: Cluster) -> None:
    db = cluster.database()
    ports(db, 6)
    health = db.health()
    assert health["degraded"] is False and health["routable"] == ["replica1", "replica2"]
    replica = health["nodes"]["replica1"]
    assert replica["role"] == "replica" and replica["breaker"] == "closed"
    assert replica["served"] == 3 and replica["lag_bytes"] is not None
    assert health["nodes"]["primary"]["role_ok"] is True
    scraped = generate_latest(metrics.REGISTRY).decode()
    cluster_label = db._router.cluster
    assert (
        f'hcrepo_routing_reads_total{{cluster="{cluster_label}",node="replica1"}}' in scraped
    )
    assert "hcrepo_replica_lag_bytes{" in scraped


# --- read-your-writes -------------------------------------------------------------------------


def test_read_your_writes_with_replay_paused(cluster: Cluster) -> None:
    db = cluster.database()
    replica_ports = {replica.port for replica in cluster.replicas}
    with cluster.replay_paused(*cluster.replicas):
        with writer(db):
            new_id = Routing(db).add_note(note="fresh")
            token = db.last_write_token()
            # Same context: the replicas have not replayed the commit, the primary answers.
            found = Routing(db).find_note(id=new_id)
            assert found.note == "fresh"
            assert found.port == cluster.primary.port
        assert token is not None

        seen: dict[str, Any] = {}

        def other_thread() -> None:
            # A new thread has an empty context: without the token a replica answers, stale.
            seen["without"] = Routing(db).find_note(id=new_id)
            with db.read_after(token):
                seen["with"] = Routing(db).find_note(id=new_id)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(30)
        assert seen["without"].port in replica_ports
        assert seen["without"].note is None
        assert seen["with"].note == "fresh"
        assert seen["with"].port == cluster.primary.port
    assert db._router.stats()["primary_for_token"] >= 2


def test_unit_of_work_token_travels_as_a_string(cluster: Cluster) -> None:
    db = cluster.database()
    with cluster.replay_paused(*cluster.replicas):
        with writer(db), db.unit_of_work() as uow:
            new_id = Routing(uow).add_note(note="from a unit of work")
        assert uow.token is not None
        assert parse_lsn(uow.token) > 0
        payload = {"token": uow.token}  # e.g. a queued job

        def job() -> Found:
            with db.read_after(payload["token"]):
                return Routing(db).find_note(id=new_id)

        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(job()))
        worker.start()
        worker.join(30)
        assert results[0].note == "from a unit of work"


def test_caught_up_token_adds_no_round_trip(cluster: Cluster) -> None:
    relays = [Relay(url) for url in cluster.replica_urls]
    try:
        db = cluster.database(read_replica_urls=[relay.url for relay in relays])
        router = db._router
        with writer(db):
            new_id = Routing(db).add_note(note="replayed")
            token = db.last_write_token()
        assert token is not None
        cluster.catch_up()
        ports(db, 4)  # every replica pool has served a read
        # The relays must see the read alone, but two things started above talk to the
        # replicas through them on threads of their own. A first read that finds its lazily
        # opened pool still connecting makes psycopg_pool grow the pool by one: that
        # connection authenticates and runs configure in a pool worker, whenever it gets to
        # it. And open() started the monitor thread, whose first cycle probes every node.
        until(lambda: all(pool_settled(node) for node in router.replicas),
              "the replica pools to finish connecting")
        until(lambda: router.monitor.cycles.value >= 2, "the monitor thread's first cycle")
        router.monitor.check_now()  # the cached replay positions now cover the token
        refreshes = [node.health.refreshes.value for node in router.replicas]
        for relay in relays:
            relay.reset()
        with db.read_after(token):
            found = Routing(db).find_note(id=new_id)
        assert found.note == "replayed"
        assert found.port in {replica.port for replica in cluster.replicas}
        assert sorted(relay.round_trips for relay in relays) == [0, 1]
        assert [node.health.refreshes.value for node in router.replicas] == refreshes
    finally:
        for relay in relays:
            relay.close()


def test_stale_cache_is_refreshed_on_demand_once_caught_up(cluster: Cluster) -> None:
    db = cluster.database(replay_cache_max_age=0)
    router = db._router
    router.monitor.check_now()
    with writer(db):
        new_id = Routing(db).add_note(note="refresh me")
        cluster.catch_up()
        # The monitor has not run since the write: only an on-demand refresh can admit a
        # replica.
        found = Routing(db).find_note(id=new_id)
    assert found.note == "refresh me"
    assert found.port in {replica.port for replica in cluster.replicas}
    assert sum(node.health.refreshes.value for node in router.replicas) == 1


def test_tokens_are_checked(cluster: Cluster) -> None:
    db = cluster.database()
    for bad in ("latest", "0/", "1/2/3", "G/0", "123456789/0"):
        with pytest.raises(InvalidToken), db.read_after(bad):
            pass
    with db.read_after(None), db.read_after(""):
        assert db.last_write_token() is None
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    with db.read_after("16/B374D848"):
        assert db.last_write_token() == "16/B374D848"
    assert db.last_write_token() is None


# --- lag ---------------------------------------------------------------------------------------


def test_lag_in_bytes_excludes_a_replica_until_it_catches_up(cluster: Cluster) -> None:
    db = cluster.database(max_lag_bytes=100_000)
    router = db._router
    lagging, other = cluster.replicas
    with cluster.replay_paused(lagging):
        with writer(db):
            Routing(db).add_bulk(count=5000)
        cluster.wait_replayed(other)
        router.monitor.check_now()
        health = router.replicas[0].health
        assert health.lagging and health.lag_bytes is not None and health.lag_bytes > 100_000
        assert router.stats()["routable"] == ["replica2"]
        assert set(ports(db, 10)) == {other.port}
    router.monitor.check_now()
    assert not router.replicas[0].health.lagging
    assert router.replicas[0].health.lag_bytes == 0
    assert set(ports(db, 10)) == {lagging.port, other.port}


def test_lag_in_seconds_excludes_a_replica_until_it_catches_up(cluster: Cluster) -> None:
    db = cluster.database(max_lag_seconds=0.3)
    router = db._router
    lagging = cluster.replicas[0]
    node = router.replicas[0]
    with cluster.replay_paused(lagging):
        with writer(db):
            Routing(db).add_note(note="a small write")
        cluster.wait_replayed(cluster.replicas[1])

        def excluded() -> bool:
            router.monitor.check_now()
            return node.health.lagging

        until(excluded, "the paused replica to lag over 0.3 s")
        assert node.health.lag_bytes is not None and node.health.lag_bytes < 100_000
        assert node.health.lag_seconds is not None and node.health.lag_seconds > 0.3
        assert set(ports(db, 6)) == {cluster.replicas[1].port}
    router.monitor.check_now()
    assert not node.health.lagging
    assert node.routable


def test_idle_primary_is_not_replica_lag(cluster: Cluster) -> None:
    db = cluster.database(max_lag_seconds=0.3)
    router = db._router
    cluster.catch_up()
    replica = cluster.replicas[0]

    def naive_lag() -> float:
        with cluster.superuser(replica) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    # No commit for longer than the maximum: now() - last replayed commit exceeds it.
    until(lambda: naive_lag() > 0.6, "the primary to be idle for 0.6 s")
    router.monitor.check_now()
    node = router.replicas[0]
    assert node.health.lag_seconds is not None and node.health.lag_seconds < 0.3
    assert not node.health.lagging
    assert node.routable


def test_no_routable_replica_degrades_to_the_primary_logged_once(
    cluster: Cluster, log_sink: Any
) -> None:
    logs: LogSink = log_sink("INFO")
    db = cluster.database(max_lag_bytes=100_000)
    router = db._router
    with cluster.replay_paused(*cluster.replicas):
        with writer(db):
            Routing(db).add_bulk(count=5000)
        for _ in range(3):
            router.monitor.check_now()
        assert router.degraded
        assert set(ports(db, 5)) == {cluster.primary.port}
    router.monitor.check_now()
    router.monitor.check_now()
    assert not router.degraded
    assert len(logs.matching("no routable replica", "replica1: lag", "replica2: lag")) == 1
    assert len(logs.matching("replica reads resumed")) == 1
    for name in ("replica1", "replica2"):
        assert len(logs.matching(f"{name} taken out of read rotation (lag")) == 1
        assert len(logs.matching(f"{name} back in read rotation")) == 1
    stats = router.stats()
    assert stats["degraded_episodes"] == 1
    assert stats["primary_degraded"] == 5


# --- roles -------------------------------------------------------------------------------------


def test_replica_url_pointing_at_the_primary_is_detected(
    cluster: Cluster, log_sink: Any
) -> None:
    logs: LogSink = log_sink("ERROR")
    db = cluster.database(
        read_replica_urls=[cluster.url(cluster.primary), cluster.replica_urls[1]]
    )
    router = db._router
    assert logs.matching("replica1 in READ_REPLICA_URLS", "is not a standby")
    assert not router.replicas[0].health.role_ok
    assert router.stats()["routable"] == ["replica2"]
    assert set(ports(db, 8)) == {cluster.replicas[1].port}
    # Even used directly, that pool cannot write: standby pools are read-only.
    with router.replicas[0].connection() as conn, pytest.raises(
        psycopg.errors.ReadOnlySqlTransaction
    ):
        conn.execute("INSERT INTO routing_items (note) VALUES ('never')")


def test_primary_url_pointing_at_a_replica_is_reported(cluster: Cluster, log_sink: Any) -> None:
    logs: LogSink = log_sink("ERROR")
    cluster.database(database_url=cluster.replica_urls[0], read_replica_urls=[])
    assert logs.matching("DATABASE_URL points at a standby")


# --- policies -----------------------------------------------------------------------------


def _spread(db: Database, threads: int, reads: int) -> Counter[int]:
    barrier = threading.Barrier(threads)
    results: list[Counter[int]] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait(30)
        seen = ports(db, reads)
        with lock:
            results.append(seen)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return sum(results, Counter())


@pytest.mark.parametrize("policy", ["round_robin", "least_busy", "lowest_latency"])
def test_policy_spreads_reads_as_it_promises(cluster: Cluster, policy: str) -> None:
    # replica2 sits behind a relay that adds 5 ms to every request: a farther server.
    slow = SlowRelay(cluster.replica_urls[1], delay=0.005)
    try:
        db = cluster.database(
            routing_policy=policy, read_replica_urls=[cluster.replica_urls[0], slow.url]
        )
        for _ in range(3):
            db._router.monitor.check_now()  # latency measured through the relay
        near, far = (replica.port for replica in cluster.replicas)
        served = _spread(db, threads=8, reads=40)
        assert sum(served.values()) == 320
        assert cluster.primary.port not in served
        if policy == "round_robin":
            assert served[near] == served[far] == 160  # strict turns, whatever the speed
        elif policy == "least_busy":
            # The near replica frees its connections sooner, so it is less busy more often.
            assert served[near] > 2 * served[far] > 0
        else:
            assert served == {near: 320}
    finally:
        slow.close()


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HCREPO_ROUTING_POLICY", "fastest"),
        ("HCREPO_HEALTH_INTERVAL", "0"),
        ("HCREPO_HEALTH_TIMEOUT", "-1"),
        ("HCREPO_MAX_LAG_SECONDS", "soon"),
        ("HCREPO_MAX_LAG_BYTES", "0"),
        ("HCREPO_REPLAY_CACHE_MAX_AGE", "-0.5"),
        ("HCREPO_BREAKER_FAILURES", "0"),
        ("HCREPO_POOL_MAX_WAITING", "-1"),
        ("HCREPO_POOL_LEAK_THRESHOLD", "0"),
        ("READ_REPLICA_URLS", "postgresql://a:1/x,not a url=="),
    ],
)
def test_bad_routing_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:1/app")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert raised.value.setting == variable


def test_routing_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "DATABASE_URL": "postgresql://app@127.0.0.1:1/app",
        "READ_REPLICA_URLS": "postgresql://app@127.0.0.1:2/app, postgresql://app@127.0.0.1:3/app",
        "HCREPO_ROUTING_POLICY": "least_busy",
        "HCREPO_HEALTH_INTERVAL": "0.5",
        "HCREPO_HEALTH_TIMEOUT": "0.25",
        "HCREPO_MAX_LAG_SECONDS": "2",
        "HCREPO_MAX_LAG_BYTES": "1048576",
        "HCREPO_REPLAY_CACHE_MAX_AGE": "0.1",
        "DB_POOL_MIN": "0",
        "DB_POOL_MAX": "7",
        "HCREPO_POOL_MAX_WAITING": "20",
        "HCREPO_POOL_MAX_LIFETIME": "600",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load()
    assert settings.read_replica_urls == [
        "postgresql://app@127.0.0.1:2/app", "postgresql://app@127.0.0.1:3/app"
    ]
    assert settings.routing_policy == "least_busy"
    assert (settings.health_interval, settings.health_timeout) == (0.5, 0.25)
    assert (settings.max_lag_seconds, settings.max_lag_bytes) == (2.0, 1048576)
    assert settings.replay_cache_max_age == 0.1
    assert (settings.pool_min, settings.pool_max, settings.pool_max_waiting) == (0, 7, 20)
    assert settings.pool_max_lifetime == 600.0


def test_a_commit_ending_on_a_wal_page_boundary_needs_only_the_boundary() -> None:
    from hcrepo.routing.consistency import commit_end

    page, segment = 8192, 16 * 1024 * 1024
    assert commit_end(5 * segment + 3 * page + 24) == 5 * segment + 3 * page
    assert commit_end(5 * segment + 40) == 5 * segment
    assert commit_end(5 * segment + 3 * page + 25) == 5 * segment + 3 * page + 25
    assert commit_end(5 * segment + 3 * page + 1000) == 5 * segment + 3 * page + 1000
