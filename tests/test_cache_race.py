"""Concurrency of the cache, made deterministic with barriers and an advisory-lock gate that
holds a query inside PostgreSQL (after its snapshot) until the test opens it:

- a reader that read before a concurrent commit cannot store a value that outlives the
  commit's invalidation, and a read after the commit never joins a flight from before it;
- 50 threads (of two Database instances, i.e. the Redis lock as well as in-process sharing)
  and 4 processes missing at once cost one database query;
- a stale value is served to everyone while exactly one background refresh runs;
- XFetch starts a refresh before the soft TTL when asked to.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from hcrepo import Database, Settings, bind_context
from hcrepo.cache.codec import read_header, rewrite_soft_expiry
from hcrepo.testing import PostgresServer, RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import RedisFactory, WaitReplayed
from tests.support.cache import (
    ENCRYPTION_KEY,
    CachedDatabase,
    CacheRepo,
    Counts,
    Gate,
    StatementCalls,
    metric,
    until,
    value_keys,
)
from tests.support.repos import Clinic, new_clinic

Client = redis.Redis | RedisCluster


@pytest.fixture
def own_clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, patients=2)


def add_patient_behind_the_cache(server: ServerDatabase, clinic: Clinic) -> None:
    with psycopg.connect(server.superuser_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
            " VALUES (%s, gen_random_uuid()::text, 'Late', 'Arrival', DATE '1990-01-01',"
            " 'unknown')", [clinic.id],
        )


# --- no stale re-insert ---------------------------------------------------------------------


def test_a_reader_that_read_before_a_commit_cannot_store_a_stale_value(
    cached_db: CachedDatabase, own_clinic: Clinic, gate: Gate
) -> None:
    reader_db, writer_db = cached_db(), cached_db()
    patient = own_clinic.patient_ids[0]
    seen: dict[str, Any] = {}

    def read() -> None:
        with reader_db.context(clinic_id=own_clinic.id):
            seen["row"] = CacheRepo(reader_db).gated_patient(id=patient, gate=gate.key)

    reader = threading.Thread(target=read)
    reader.start()
    until(lambda: gate.waiting() == 1, what="the reader inside its database read")
    with writer_db.context(clinic_id=own_clinic.id, actor_id=own_clinic.actor_id):
        CacheRepo(writer_db).set_phone(id=patient, phone="+1 555 0151")  # commit, invalidate
    gate.open()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert seen["row"].phone is None  # it really read the state from before the commit

    counts = Counts("cache_gated_patient")
    for db in (reader_db, writer_db):
        with db.context(clinic_id=own_clinic.id):
            row = CacheRepo(db).gated_patient(id=patient, gate=gate.key)
        assert row is not None and row.phone == "+1 555 0151"
    assert counts["misses"] == 1 and counts["hits"] == 1


def test_a_read_after_a_commit_never_joins_a_flight_that_began_before_it(
    cached_db: CachedDatabase, own_clinic: Clinic, gate: Gate
) -> None:
    db = cached_db(cache_lock_timeout=30)
    patient = own_clinic.patient_ids[0]
    results: dict[str, Any] = {}

    def read(name: str) -> None:
        with db.context(clinic_id=own_clinic.id):
            results[name] = CacheRepo(db).gated_patient(id=patient, gate=gate.key)

    counts = Counts("cache_gated_patient")
    before = threading.Thread(target=read, args=("before",))
    before.start()
    until(lambda: gate.waiting() == 1, what="the first read inside PostgreSQL")
    with db.context(clinic_id=own_clinic.id, actor_id=own_clinic.actor_id):
        CacheRepo(db).set_phone(id=patient, phone="+1 555 0152")
    after = threading.Thread(target=read, args=("after",))
    after.start()
    # It must wait on the Redis lock as a new leader, not join the in-process flight.
    until(lambda: counts["coalesced_redis"] + counts["coalesced_process"] == 1,
          what="the second read to wait")
    assert counts["coalesced_redis"] == 1
    gate.open()
    for thread in (before, after):
        thread.join(timeout=30)
    assert results["before"].phone is None
    assert results["after"].phone == "+1 555 0152"


# --- stampede -------------------------------------------------------------------------------


def test_fifty_threads_missing_at_once_cost_one_database_query(
    cached_db: CachedDatabase, own_clinic: Clinic, gate: Gate, statement_calls: StatementCalls
) -> None:
    dbs = [cached_db(cache_lock_timeout=30), cached_db(cache_lock_timeout=30)]
    threads = 50
    barrier = threading.Barrier(threads)
    counts = Counts("cache_gated_count")
    calls = statement_calls("cache_gated_count")

    def read(db: Database) -> int:
        with db.context(clinic_id=own_clinic.id):
            barrier.wait(timeout=30)
            return CacheRepo(db).gated_count(gate=gate.key)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(bind_context(read), dbs[n % 2]) for n in range(threads)]
        until(lambda: gate.waiting() == 1, what="the one leader inside PostgreSQL")
        # 24 + 24 threads share their instance's flight; the other instance's leader waits on
        # the Redis lock. Only then is the query let through.
        until(lambda: counts["coalesced_process"] == 48 and counts["coalesced_redis"] == 1,
              what="every other caller waiting")
        assert gate.waiting() == 1
        gate.open()
        results = [future.result(timeout=30) for future in futures]
    assert results == [2] * threads
    assert statement_calls("cache_gated_count") - calls == 1
    assert counts["misses"] == 1


def _read_in_a_process(
    settings: dict[str, Any], clinic_id: UUID, gate_key: int,
    barrier: Any, results: Any,
) -> None:
    with Database(Settings(**settings)) as db, db.context(clinic_id=clinic_id):
        barrier.wait(timeout=60)
        value = CacheRepo(db).gated_count(gate=gate_key)
        results.put((value, metric("hcrepo_cache_misses", query="cache_gated_count")))


def test_processes_missing_at_once_cost_one_database_query(
    redis_factory: RedisFactory, migrated_db: ServerDatabase, own_clinic: Clinic, gate: Gate,
    statement_calls: StatementCalls,
) -> None:
    server: RedisServer = redis_factory()
    processes = 4
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(processes)
    results = spawn.Queue()
    settings = {
        "database_url": migrated_db.app_url, "redis_url": server.url, "pool_min": 1,
        "pool_max": 1, "cache_encryption_key": ENCRYPTION_KEY, "cache_lock_timeout": 60,
    }
    calls = statement_calls("cache_gated_count")
    children = [
        spawn.Process(target=_read_in_a_process,
                      args=(settings, own_clinic.id, gate.key, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        with server.client() as watcher:
            own = watcher.client_id()

            def sent(command: str) -> int:
                return sum(1 for c in watcher.client_list()
                           if int(c["id"]) != own and c["cmd"] == command)

            # The value cannot exist while the gate is shut, so each process whose read
            # connection has sent its MGET has missed; one whose script connection has also
            # asked for the fill lock waits for the holder: wait for all, then let the query
            # run (a process let go between the two would find the lock free).
            until(lambda: gate.waiting() == 1 and sent("mget") == processes
                  and sent("evalsha") == processes, timeout=60, what="every process to miss")
        gate.open()
        outcomes = [results.get(timeout=60) for _ in range(processes)]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert [value for value, _ in outcomes] == [2] * processes
    assert sorted(misses for _, misses in outcomes) == [0.0] * (processes - 1) + [1.0]
    assert statement_calls("cache_gated_count") - calls == 1
    with pytest.raises(queue.Empty):
        results.get_nowait()


# --- stale while revalidate -----------------------------------------------------------------


def test_a_stale_value_is_served_while_exactly_one_refresh_runs(
    cached_db: CachedDatabase, own_clinic: Clinic, gate: Gate, raw_redis: Client,
    statement_calls: StatementCalls, migrated_db: ServerDatabase,
) -> None:
    dbs = [cached_db(), cached_db()]  # two processes: the refresh is single cluster-wide
    gate.open()
    with dbs[0].context(clinic_id=own_clinic.id):
        assert CacheRepo(dbs[0]).gated_count(gate=gate.key) == 2
    [key] = value_keys(raw_redis, dbs[0].settings.cache_key_prefix, "cache_gated_count")
    fresh = raw_redis.get(key)
    assert fresh is not None
    raw_redis.set(key, rewrite_soft_expiry(fresh, 0), keepttl=True)  # past its soft TTL
    add_patient_behind_the_cache(migrated_db, own_clinic)
    gate.close()

    threads = 20
    barrier = threading.Barrier(threads)
    counts = Counts("cache_gated_count")
    calls = statement_calls("cache_gated_count")

    def read(db: Database) -> int:
        with db.context(clinic_id=own_clinic.id):
            barrier.wait(timeout=30)
            return CacheRepo(db).gated_count(gate=gate.key)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        stale = list(pool.map(bind_context(read), [dbs[n % 2] for n in range(threads)]))
    assert stale == [2] * threads  # nobody waited: the refresh is still held at the gate
    assert counts["stale"] == threads and counts["refreshes"] == 1
    until(lambda: gate.waiting() == 1, what="the refresh inside PostgreSQL")
    gate.open()
    until(lambda: is_fresh(raw_redis, key), what="the refreshed value")
    with dbs[1].context(clinic_id=own_clinic.id):
        assert CacheRepo(dbs[1]).gated_count(gate=gate.key) == 3
    assert counts["refreshes"] == 1 and counts["misses"] == 0
    assert statement_calls("cache_gated_count") - calls == 1


def is_fresh(client: Client, key: bytes) -> bool:
    """Whether the entry under key is before its soft expiry."""
    raw = client.get(key)
    return raw is not None and read_header(raw).soft_expiry_ms > time.time() * 1000


@pytest.mark.parametrize("beta", [0.0, 1e12])
def test_xfetch_refreshes_early_only_when_enabled(
    cached_db: CachedDatabase, own_clinic: Clinic, gate: Gate, statement_calls: StatementCalls,
    beta: float,
) -> None:
    db = cached_db(cache_xfetch_beta=beta)
    gate.open()
    counts = Counts("cache_gated_count")
    calls = statement_calls("cache_gated_count")
    with db.context(clinic_id=own_clinic.id):
        values = [CacheRepo(db).gated_count(gate=gate.key) for _ in range(3)]
    assert values == [2, 2, 2]
    assert counts["stale"] == 0 and counts["hits"] == 2
    if beta:
        assert counts["refreshes"] >= 1
        until(lambda: statement_calls("cache_gated_count") - calls == 1 + counts["refreshes"],
              what="the early refreshes")
    else:
        assert counts["refreshes"] == 0
        assert statement_calls("cache_gated_count") - calls == 1


# --- replicas -------------------------------------------------------------------------------


def test_fills_right_after_a_commit_are_not_stored_while_a_replica_may_lag(
    cached_db: CachedDatabase, own_clinic: Clinic, migrated_db: ServerDatabase,
    pg_replica: PostgresServer, wait_replayed: WaitReplayed,
) -> None:
    wait_replayed(pg_replica)  # the clinic's rows are on the replica
    # The lag window is HCREPO_MAX_LAG_SECONDS plus two health intervals: 0.7 s here.
    db = cached_db(read_replica_urls=[migrated_db.replica_app_url(pg_replica)],
                   max_lag_seconds=0.5, health_interval=0.1)
    repo = CacheRepo(db)
    patient = own_clinic.patient_ids[0]
    with db.context(clinic_id=own_clinic.id, actor_id=own_clinic.actor_id):
        assert repo.count() == 2
        counts = Counts("cache_patient_count")
        repo.set_phone(id=patient, phone="+1 555 0181")  # commits, tombstones "patients"
        # A replica may not have replayed the commit yet: what a fill reads now is returned
        # but never stored (nor is the old value served).
        assert repo.count() == 2 and repo.count() == 2
        assert counts["replica_lag_window"] == 2 and counts["hits"] == 0
        until(lambda: repo.count() == 2 and counts["misses"] == 1, what="the window to pass")
        assert repo.count() == 2
        assert counts["hits"] == 1
