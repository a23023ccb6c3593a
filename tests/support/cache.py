"""What the cache tests share: repositories over tests/sql/cache.sql, a gate that holds a
query inside PostgreSQL until the test opens it, and the counters the tests read (fixtures
are in tests/cache_fixtures.py).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from uuid import UUID

import psycopg
import redis
from pydantic import BaseModel
from redis.cluster import RedisCluster

from hcrepo import Database, Repository, cached, query
from hcrepo.cache.store import CLUSTER_SCHEME
from hcrepo.ops import metrics
from tests.plugins.database import Database as ServerDatabase

ENCRYPTION_KEY = base64.b64encode(bytes(range(32))).decode()
FAKE_PHI = "Zqxvorth-PHI-4471"  # a surname no seed or other test uses


class CachedPatient(BaseModel):
    id: UUID
    clinic_id: UUID
    mrn: str
    last_name: str
    phone: str | None


class CacheRepo(Repository, sql="../sql/cache.sql"):
    @query("cache_patient", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"])
    def patient(self, *, id: UUID) -> CachedPatient | None: ...

    @query("cache_patients_named", phi=True)
    @cached(ttl=60, tags=["patients"])
    def named(self, *, last_name: str) -> list[CachedPatient]: ...

    @query("cache_patient_count")
    @cached(ttl="clinic", tags=["patients"])
    def count(self) -> int: ...

    @query("cache_set_phone", phi=True, invalidates=["patient:{id}", "patients"])
    def set_phone(self, *, id: UUID, phone: str) -> int: ...

    @query("cache_set_phone_quietly", phi=True, invalidates=["patient:{id}"])
    def set_phone_only(self, *, id: UUID, phone: str) -> int: ...

    @query("cache_gated_patient", phi=True)
    @cached(ttl=60, tags=["patient:{id}"])
    def gated_patient(self, *, id: UUID, gate: int) -> CachedPatient | None: ...

    @query("cache_gated_count")
    @cached(ttl=60, tags=["patients"])
    def gated_count(self, *, gate: int) -> int: ...


CachedDatabase = Callable[..., Database]


class PlainCount(Repository, sql="../sql/cache.sql"):
    """The same count without @cached: what the database says, bypassing every cache."""

    @query("cache_patient_count")
    def count(self) -> int: ...


class CacheRepoV2(Repository, sql="../sql/cache.sql"):
    """cache_patient with other SQL text (v2) and, separately, with another model."""

    @query("cache_patient_v2", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"])
    def patient(self, *, id: UUID) -> CachedPatient | None: ...


class CacheRepoNotPhi(Repository, sql="../sql/cache.sql"):
    """cache_patient without phi=True: stored in plain text, so under other keys."""

    @query("cache_patient")
    @cached(ttl="patient", tags=["patient:{id}"])
    def patient(self, *, id: UUID) -> CachedPatient | None: ...


class CacheRepoUntagged(Repository, sql="../sql/cache.sql"):
    """cache_patient_count with no tags and no PHI (nothing but its key protects it), kept
    for CACHE_TTL."""

    @query("cache_patient_count")
    @cached(ttl="default")
    def count(self) -> int: ...


class SlimPatient(BaseModel):
    id: UUID
    clinic_id: UUID
    mrn: str
    last_name: str
    phone: str | None
    nickname: str | None = None


class CacheRepoOtherModel(Repository, sql="../sql/cache.sql"):
    @query("cache_patient", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"])
    def patient(self, *, id: UUID) -> SlimPatient | None: ...


def redis_client(url: str) -> redis.Redis | RedisCluster:
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME))
    return redis.Redis.from_url(url)


def keys_of(client: redis.Redis | RedisCluster, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))


def value_keys(client: redis.Redis | RedisCluster, prefix: str, query: str) -> list[bytes]:
    return [k for k in keys_of(client, prefix) if f":v:{query}:".encode() in k]


# --- counters -----------------------------------------------------------------------------


def metric(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(f"{name}_total", labels) or 0.0


class Counts:
    """Deltas of the cache metrics of one query since the snapshot was taken."""

    NAMES = ("hits", "misses", "stale", "refreshes")

    def __init__(self, query: str) -> None:
        self.query = query
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        now = {n: metric(f"hcrepo_cache_{n}", query=self.query) for n in self.NAMES}
        for via in ("process", "redis"):
            now[f"coalesced_{via}"] = metric("hcrepo_cache_coalesced", query=self.query, via=via)
        for reason in ("redis_unavailable", "invalidation_pending", "phi_without_key",
                       "lock_wait_timeout", "replica_lag_window"):
            now[reason] = metric("hcrepo_cache_bypassed", query=self.query, reason=reason)
        return now

    def __getitem__(self, name: str) -> float:
        return self._now()[name] - self._start[name]

    def delta(self) -> dict[str, float]:
        now = self._now()
        return {k: now[k] - v for k, v in self._start.items() if now[k] != v}


class StatementCalls:
    """How often PostgreSQL executed a query, from pg_stat_statements (superuser)."""

    def __init__(self, server: ServerDatabase) -> None:
        self._url = server.superuser_url
        with psycopg.connect(self._url, autocommit=True) as conn:
            schema = conn.execute(
                "SELECT extnamespace::regnamespace::text FROM pg_extension"
                " WHERE extname = 'pg_stat_statements'"
            ).fetchone()
            if schema is None:
                conn.execute("CREATE SCHEMA IF NOT EXISTS hcrepo_test_stats")
                conn.execute("CREATE EXTENSION pg_stat_statements SCHEMA hcrepo_test_stats")
                schema = ("hcrepo_test_stats",)
        self._view = f"{schema[0]}.pg_stat_statements"

    def __call__(self, query_name: str) -> int:
        with psycopg.connect(self._url, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT coalesce(sum(calls), 0) FROM {self._view}"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND query LIKE %s",
                [f"/* hcrepo:{query_name} */%"],
            ).fetchone()
        assert row is not None
        return int(row[0])


class Gate:
    """An advisory lock the test holds: cache_gated_* queries block on it inside PostgreSQL
    (after their snapshot was taken) until `open()`."""

    def __init__(self, server: ServerDatabase) -> None:
        self.key = uuid.uuid4().int % 2**31
        self._conn = psycopg.connect(server.superuser_url, autocommit=True)
        self.held = False
        self.close()

    def close(self) -> None:
        if not self.held:
            self._conn.execute("SELECT pg_advisory_lock(%s)", [self.key])
            self.held = True

    def open(self) -> None:
        if self.held:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", [self.key])
            self.held = False

    def waiting(self) -> int:
        """Backends blocked on the gate right now."""
        row = self._conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0"
            " AND objid = %s AND NOT granted", [self.key],
        ).fetchone()
        assert row is not None
        return int(row[0])

    def release(self) -> None:
        self.open()
        self._conn.close()


def until(condition: Callable[[], object], *, timeout: float = 10.0, what: str = "") -> None:
    """Wait for a condition another thread or process brings about (bounded)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def fake_phi_patient(server: ServerDatabase, clinic_id: UUID) -> UUID:
    """A patient whose surname is FAKE_PHI (inserted by the superuser)."""
    with psycopg.connect(server.superuser_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex,"
            " phone) VALUES (%s, %s, 'Fake', %s, DATE '1971-02-03', 'unknown',"
            " '+1 555 0199') RETURNING id",
            [clinic_id, f"phi-{uuid.uuid4().hex[:8]}", FAKE_PHI],
        ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def set_phone_behind_the_cache(server: ServerDatabase, patient_id: UUID, phone: str) -> None:
    """Change a row without telling the cache (the superuser, straight to PostgreSQL)."""
    with psycopg.connect(server.superuser_url, autocommit=True) as conn:
        conn.execute("UPDATE patients SET phone = %s WHERE id = %s", [phone, patient_id])
