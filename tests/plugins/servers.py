"""Fixtures for the throw-away servers of hcrepo.testing.

Session-scoped so the whole suite shares one primary, its replicas, one Redis and one
Redis Cluster; each is started only when a test first asks for it and torn down at the
end of the session whatever the tests did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import pytest

from hcrepo.testing import (
    PostgresServer,
    RedisCluster,
    RedisServer,
    wait_for_replay,
)

REPLICA_COUNT = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the three-node Redis Cluster (runs in the normal suite)"
    )


@pytest.fixture(scope="session")
def pg_primary() -> Iterator[PostgresServer]:
    """A started PostgreSQL primary; the superuser is `postgres` / superuser_password."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_replicas(pg_primary: PostgresServer) -> Iterator[list[PostgresServer]]:
    """Two hot-standby streaming replicas of pg_primary."""
    with contextlib.ExitStack() as stack:
        replicas = []
        for _ in range(REPLICA_COUNT):
            replica = pg_primary.create_replica()
            stack.callback(replica.close)
            replicas.append(replica)
        yield replicas


@pytest.fixture(scope="session")
def pg_replica(pg_replicas: list[PostgresServer]) -> PostgresServer:
    """The first streaming replica of pg_primary."""
    return pg_replicas[0]


class WaitReplayed(Protocol):
    def __call__(self, replica: PostgresServer, lsn: str | None = None) -> None: ...


@pytest.fixture(scope="session")
def wait_replayed(pg_primary: PostgresServer) -> WaitReplayed:
    """Block until a replica has replayed `lsn` (default: the primary's LSN right now)."""

    def wait(replica: PostgresServer, lsn: str | None = None) -> None:
        primary = replica.primary or pg_primary
        wait_for_replay(replica, lsn if lsn is not None else primary.current_wal_lsn())

    return wait


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A started Redis shared by the session: a test that kill()s it must restart() it."""
    with RedisServer() as server:
        yield server


class RedisFactory(Protocol):
    def __call__(self, *extra_args: str) -> RedisServer: ...


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    """Start extra Redis servers (extra redis-server arguments allowed) closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(*extra_args: str) -> RedisServer:
            return stack.enter_context(RedisServer(extra_args=extra_args))

        yield start


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A started three-master Redis Cluster."""
    with RedisCluster() as cluster:
        yield cluster
