"""Redis down or slow never fails a read: Redis killed under a threaded read load, Redis
paused (slow), invalidations that cannot land (queued, retried, bounded), automatic recovery.
Each test runs its own Redis from redis_factory, so the session's server is left alone."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections.abc import Iterator

import pytest
from loguru import logger

import hcrepo.cache.invalidation
from hcrepo.ops import metrics
from hcrepo.ops.breaker import BreakerState, CircuitBreaker
from hcrepo.testing import RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import RedisFactory
from tests.support.cache import CachedDatabase, CacheRepo, Counts, metric, until, value_keys
from tests.support.repos import Clinic, new_clinic

FAST_FAILING = {"cache_socket_timeout": 0.1, "breaker_failures": 2, "breaker_reset": 0.2}


@pytest.fixture
def own_clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, patients=3)


@pytest.fixture
def redis(redis_factory: RedisFactory) -> RedisServer:
    return redis_factory()


@pytest.fixture
def logged() -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: seen.append((m.record["level"].name, m.record["message"])), level="INFO"
    )
    yield seen
    logger.remove(sink)


def pending() -> float:
    return metrics.REGISTRY.get_sample_value("hcrepo_cache_pending_invalidations") or 0.0


def warnings_about(logged: list[tuple[str, str]], text: str) -> int:
    return sum(1 for level, message in logged if level == "WARNING" and text in message)


# --- Redis killed ----------------------------------------------------------------------------


def test_redis_killed_under_load_fails_no_read_and_caching_resumes_after_restart(
    cached_db: CachedDatabase, redis: RedisServer, own_clinic: Clinic,
    logged: list[tuple[str, str]],
) -> None:
    db = cached_db(redis_url=redis.url, **FAST_FAILING)
    patients = own_clinic.patient_ids
    threads = 8
    attempted, failed = itertools.count(), itertools.count()
    errors: list[BaseException] = []
    stop = threading.Event()
    started = threading.Barrier(threads + 1)
    counts = Counts("cache_patient")

    def load() -> None:
        repo = CacheRepo(db)
        with db.context(clinic_id=own_clinic.id):
            started.wait(timeout=30)
            for n in itertools.count():
                if stop.is_set():
                    return
                next(attempted)
                try:
                    row = repo.patient(id=patients[n % len(patients)])
                    assert row is not None and row.id == patients[n % len(patients)]
                except BaseException as exc:
                    next(failed)
                    errors.append(exc)

    def reads() -> int:
        return int(repr(attempted)[6:-1])

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        started.wait(timeout=30)
        until(lambda: counts["hits"] >= 200, what="a warm cache under load")
        redis.kill()  # mid-flight: some reads are inside Redis calls right now
        killed_at = reads()
        until(lambda: reads() >= killed_at + 2000, timeout=30, what="reads during the outage")
        down = counts.delta()
        redis.restart()
        hits_at_restart = counts["hits"]
        until(lambda: counts["hits"] >= hits_at_restart + 200, timeout=30,
              what="caching to resume")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    total, failures = reads(), int(repr(failed)[6:-1])
    print(f"\nRedis killed under load: {total} reads attempted, {failures} failed; "
          f"during the outage {down.get('redis_unavailable', 0):.0f} went to the database")
    assert failures == 0, errors[:3]
    assert down.get("redis_unavailable", 0) >= 1000
    assert warnings_about(logged, "Redis cache unavailable") == 1
    assert any("reachable again" in message for _, message in logged)
    assert metric("hcrepo_cache_errors", query="cache_patient", kind="redis") >= 1


# --- Redis slow ------------------------------------------------------------------------------


def test_a_paused_redis_costs_a_few_short_timeouts_then_reads_skip_it(
    cached_db: CachedDatabase, redis: RedisServer, own_clinic: Clinic,
    logged: list[tuple[str, str]],
) -> None:
    db = cached_db(redis_url=redis.url, **FAST_FAILING)
    repo = CacheRepo(db)
    with redis.client() as admin, db.context(clinic_id=own_clinic.id):
        assert repo.count() == 3
        counts = Counts("cache_patient_count")
        # Every command hangs for 3 s (even CLIENT UNPAUSE would: the pause just runs out).
        admin.client_pause(3000, all=True)
        started = time.monotonic()
        values = [repo.count() for _ in range(20)]
        elapsed = time.monotonic() - started
        assert values == [3] * 20
        # Two reads time out (0.1 s each) and open the breaker; the rest skip Redis.
        assert elapsed < 1.5, elapsed
        assert counts["redis_unavailable"] == 20 and counts["hits"] == 0
        until(lambda: repo.count() == 3 and counts["hits"] > 0, what="caching to resume")
    assert warnings_about(logged, "Redis cache unavailable (TimeoutError)") == 1


# --- invalidations that cannot land ------------------------------------------------------------


def test_a_failed_invalidation_is_queued_retried_and_bounded_by_the_ttl(
    cached_db: CachedDatabase, redis: RedisServer, own_clinic: Clinic,
    logged: list[tuple[str, str]],
) -> None:
    writer, reader = cached_db(redis_url=redis.url, **FAST_FAILING), cached_db(
        redis_url=redis.url, **FAST_FAILING
    )
    patient = own_clinic.patient_ids[0]
    failures = metric("hcrepo_cache_invalidation_failures")
    pending_before = pending()
    with redis.client() as admin, writer.context(clinic_id=own_clinic.id,
                                                 actor_id=own_clinic.actor_id):
        for db in (writer, reader):
            assert CacheRepo(db).patient(id=patient).phone is None  # type: ignore[union-attr]
        [key] = value_keys(admin, writer.settings.cache_key_prefix, "cache_patient")
        counts = Counts("cache_patient")
        admin.client_pause(30_000, all=False)  # writes hang, reads still work
        try:
            CacheRepo(writer).set_phone(id=patient, phone="+1 555 0161")  # commit succeeds
            assert metric("hcrepo_cache_invalidation_failures") == failures + 1
            assert warnings_about(logged, "invalidation could not reach Redis") == 1
            # The writer's process never serves what it could not invalidate ...
            assert CacheRepo(writer).patient(id=patient).phone == "+1 555 0161"  # type: ignore[union-attr]
            assert counts["invalidation_pending"] == 1
            assert pending() == pending_before + 4  # 2 tags, in the clinic and non-tenant keys
            # ... another process may, for at most the entry's TTL (its Redis expiry).
            assert 0 < admin.pttl(key) <= 1800 * 1000
        finally:
            admin.client_unpause()
        until(lambda: pending() == pending_before, what="the queued invalidation to land")
    # The next request, with no write of its own (the writer's block skips older entries).
    with writer.context(clinic_id=own_clinic.id, actor_id=own_clinic.actor_id):
        for db in (reader, writer):
            assert CacheRepo(db).patient(id=patient).phone == "+1 555 0161"  # type: ignore[union-attr]
        assert CacheRepo(writer).patient(id=patient).phone == "+1 555 0161"  # type: ignore[union-attr]
        assert counts["hits"] >= 1  # caching resumed
    assert any("queued cache invalidations delivered" in message for _, message in logged)


def test_too_many_queued_invalidations_collapse_into_whole_namespaces(
    cached_db: CachedDatabase, redis: RedisServer, own_clinic: Clinic,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hcrepo.cache.invalidation, "MAX_PENDING", 3)
    db = cached_db(redis_url=redis.url, **FAST_FAILING)
    first, second, untouched = own_clinic.patient_ids
    pending_before = pending()
    with redis.client() as admin, db.context(clinic_id=own_clinic.id,
                                             actor_id=own_clinic.actor_id):
        repo = CacheRepo(db)
        assert repo.patient(id=untouched) is not None
        admin.client_pause(30_000, all=False)
        try:
            repo.set_phone_only(id=first, phone="+1 555 0171")  # 2 keys: clinic + non-tenant
            repo.set_phone_only(id=second, phone="+1 555 0172")  # 4 > 3: whole namespaces
            assert pending() == pending_before + 2  # two namespaces instead of four tags
        finally:
            admin.client_unpause()
        until(lambda: pending() == pending_before, what="delivery")
        counts = Counts("cache_patient")
        assert repo.patient(id=untouched) is not None
        assert counts["misses"] == 1  # no write named its tag, but its whole clinic was retired


# --- the breaker itself -------------------------------------------------------------------------


def test_breaker_opens_lets_one_probe_through_and_closes_on_success() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset=1.0, clock=lambda: now[0])
    assert breaker.allow() and not breaker.failure()
    assert breaker.failure()  # the second consecutive failure opens it
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 1.5
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    assert not breaker.failure()  # the probe failed: open for another period
    assert not breaker.allow()
    assert not breaker.success()  # a straggler from before: still open
    assert breaker.state is BreakerState.OPEN
    now[0] = 3.0
    assert breaker.allow() and breaker.success()  # the probe worked: closed
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()
    assert not breaker.failure() and breaker.success() is False  # below the threshold


# --- fork ------------------------------------------------------------------------------------


def test_a_forked_child_reads_on_its_own_redis_connections(
    cached_db: CachedDatabase, redis: RedisServer, own_clinic: Clinic,
    migrated_db: ServerDatabase,
) -> None:
    db = cached_db(redis_url=redis.url)
    other = new_clinic(migrated_db.superuser_url, patients=1)
    for clinic in (own_clinic, other):
        with db.context(clinic_id=clinic.id):
            CacheRepo(db).count()  # cached; the parent's read connection is idle, pooled
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    start = fork.Barrier(2)

    def errors() -> float:
        return sum(metric("hcrepo_cache_errors", query="cache_patient_count", kind=kind)
                   for kind in ("redis", "unreadable"))

    def child() -> None:
        with db.context(clinic_id=other.id):
            start.wait(timeout=30)
            values = [CacheRepo(db).count() for _ in range(500)]
            results.put((values, errors() - errors_before))

    errors_before = errors()

    process = fork.Process(target=child)
    process.start()
    try:
        # Both read at once, different clinics: a socket shared with the parent would hand
        # each side the other's replies (or garble them).
        with db.context(clinic_id=own_clinic.id):
            start.wait(timeout=30)
            parent = [CacheRepo(db).count() for _ in range(500)]
        from_child, child_errors = results.get(timeout=60)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
    assert parent == [3] * 500 and from_child == [1] * 500
    assert errors() - errors_before == 0 and child_errors == 0  # and no crossed replies
