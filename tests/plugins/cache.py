"""Fixtures of the cache tests: databases
wired to a Redis (standalone here; test_cache_cluster overrides `cache_redis_url`), a raw
client to look inside, statement counts and the advisory-lock gate."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from hcrepo import Database
from hcrepo.testing import RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.support.cache import (
    ENCRYPTION_KEY,
    CachedDatabase,
    Gate,
    StatementCalls,
    redis_client,
)
from tests.support.repos import MakeDatabase


@pytest.fixture
def cache_redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def cached_db(make_db: MakeDatabase, cache_redis_url: str) -> CachedDatabase:
    """Databases with the cache on; every one made in a test shares that test's key prefix,
    so they behave like processes of one deployment and never see another test's keys."""
    prefix = f"t{uuid.uuid4().hex[:10]}"

    def make(**overrides: Any) -> Database:
        options: dict[str, Any] = {
            "redis_url": cache_redis_url,
            "cache_key_prefix": prefix,
            "cache_encryption_key": ENCRYPTION_KEY,
            "pool_max": 8,
            **overrides,
        }
        return make_db(**options)

    return make


@pytest.fixture
def raw_redis(cache_redis_url: str) -> Iterator[redis.Redis | RedisCluster]:
    client = redis_client(cache_redis_url)
    yield client
    client.close()


@pytest.fixture
def statement_calls(migrated_db: ServerDatabase) -> StatementCalls:
    return StatementCalls(migrated_db)


@pytest.fixture
def gate(migrated_db: ServerDatabase) -> Iterator[Gate]:
    held = Gate(migrated_db)
    yield held
    held.release()
