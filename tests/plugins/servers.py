"""The suite's server fixtures under their own names, all from hcrepo.testing.plugin.

One implementation serves this suite and applications' suites alike: each fixture here is
the plugin's (session-scoped, started when first asked for, torn down at the end of the
session whatever the tests did).
"""

from __future__ import annotations

import pytest

from hcrepo.testing import PostgresServer, RedisCluster, RedisServer
from hcrepo.testing.plugin import RedisFactory, WaitReplayed

__all__ = ["RedisFactory", "WaitReplayed"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the three-node Redis Cluster (runs in the normal suite)"
    )


@pytest.fixture(scope="session")
def pg_primary(hcrepo_postgres: PostgresServer) -> PostgresServer:
    """A started PostgreSQL primary; the superuser is `postgres` / superuser_password."""
    return hcrepo_postgres


@pytest.fixture(scope="session")
def pg_replicas(hcrepo_replicas: list[PostgresServer]) -> list[PostgresServer]:
    """Two hot-standby streaming replicas of pg_primary."""
    return hcrepo_replicas


@pytest.fixture(scope="session")
def pg_replica(hcrepo_replica: PostgresServer) -> PostgresServer:
    """The first streaming replica of pg_primary."""
    return hcrepo_replica


@pytest.fixture(scope="session")
def wait_replayed(hcrepo_wait_replayed: WaitReplayed) -> WaitReplayed:
    """Block until a replica has replayed `lsn` (default: the primary's LSN right now)."""
    return hcrepo_wait_replayed


@pytest.fixture(scope="session")
def redis_server(hcrepo_redis: RedisServer) -> RedisServer:
    """A started Redis shared by the session: a test that kill()s it must restart() it."""
    return hcrepo_redis


@pytest.fixture
def redis_factory(hcrepo_redis_factory: RedisFactory) -> RedisFactory:
    """Start extra Redis servers (extra redis-server arguments allowed) closed after the test."""
    return hcrepo_redis_factory


@pytest.fixture(scope="session")
def redis_cluster(hcrepo_redis_cluster: RedisCluster) -> RedisCluster:
    """A started three-master Redis Cluster."""
    return hcrepo_redis_cluster
