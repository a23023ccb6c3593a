"""pytest plugin: hcrepo's throw-away servers and per-test databases as fixtures.

An application's test suite loads it from its top-level conftest.py:

    pytest_plugins = ["hcrepo.testing.plugin"]

Session-scoped, each started when a test first asks for it and closed at the end of the
session whatever the tests did:

- `hcrepo_postgres`: a PostgreSQL primary (`PostgresServer`); superuser `postgres` with
  `superuser_password`.
- `hcrepo_replica`: a hot-standby streaming replica of it; `hcrepo_replicas`: two, the
  first being `hcrepo_replica`.
- `hcrepo_wait_replayed`: `wait(replica, lsn=None)` returns once the replica has replayed
  `lsn` (default: its primary's WAL position at the call).
- `hcrepo_redis`: a Redis server (`RedisServer`); a test that kill()s it must restart() it.
- `hcrepo_redis_cluster`: a three-master Redis Cluster (`RedisCluster`).

Per test:

- `hcrepo_redis_factory`: `start(*redis_server_args)` starts more Redis servers, closed
  after the test.
- `hcrepo_database`: an empty database on `hcrepo_postgres` (`ScratchDatabase`), and
  `hcrepo_database_factory`: `make()` as many as the test needs. pytest-postgresql's
  `DatabaseJanitor` creates them and drops them after the test. `ScratchDatabase.bootstrap`
  hands one to hcrepo's owner role, ready for `hcrepo.admin.migrate.apply`.

pytest-postgresql does the per-test databases. The servers are hcrepo's own, for what its
process fixtures cannot do: streaming replicas, running under root as an unprivileged user
(PostgreSQL refuses root), Redis and Redis Cluster.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from hcrepo.admin import migrate
from hcrepo.testing.postgres import PostgresServer, wait_for_replay
from hcrepo.testing.redis import RedisCluster, RedisServer


@dataclass(frozen=True)
class ScratchDatabase:
    """An empty database made for one test; the superuser owns it until `bootstrap`."""

    server: PostgresServer
    dbname: str

    @property
    def superuser_url(self) -> str:
        return self.server.url(
            user="postgres", password=self.server.superuser_password, dbname=self.dbname
        )

    def bootstrap(self, *, owner_password: str) -> str:
        """hcrepo's owner role (`migrate.bootstrap`, which also hands it this database, made
        by the janitor as the superuser); its URL."""
        owner_url = migrate.bootstrap(
            self.server.superuser_url, database=self.dbname, owner_password=owner_password
        )
        return owner_url


DatabaseFactory = Callable[[], ScratchDatabase]


class WaitReplayed(Protocol):
    def __call__(self, replica: PostgresServer, lsn: str | None = None) -> None: ...


class RedisFactory(Protocol):
    def __call__(self, *extra_args: str) -> RedisServer: ...


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hcrepo_postgres() -> Iterator[PostgresServer]:
    """A started PostgreSQL primary; the superuser is `postgres` / superuser_password."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def hcrepo_replica(hcrepo_postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A hot-standby streaming replica of hcrepo_postgres."""
    with contextlib.closing(hcrepo_postgres.create_replica()) as replica:
        yield replica


@pytest.fixture(scope="session")
def hcrepo_replicas(
    hcrepo_postgres: PostgresServer, hcrepo_replica: PostgresServer
) -> Iterator[list[PostgresServer]]:
    """Two hot-standby streaming replicas of hcrepo_postgres, hcrepo_replica first."""
    with contextlib.closing(hcrepo_postgres.create_replica()) as second:
        yield [hcrepo_replica, second]


@pytest.fixture(scope="session")
def hcrepo_wait_replayed(hcrepo_postgres: PostgresServer) -> WaitReplayed:
    """Block until a replica has replayed `lsn` (default: the primary's LSN right now)."""

    def wait(replica: PostgresServer, lsn: str | None = None) -> None:
        primary = replica.primary or hcrepo_postgres
        wait_for_replay(replica, lsn if lsn is not None else primary.current_wal_lsn())

    return wait


@pytest.fixture
def hcrepo_database_factory(hcrepo_postgres: PostgresServer) -> Iterator[DatabaseFactory]:
    """Make empty databases on hcrepo_postgres; all dropped after the test."""
    with contextlib.ExitStack() as stack:

        def make() -> ScratchDatabase:
            janitor = DatabaseJanitor(
                user="postgres", password=hcrepo_postgres.superuser_password,
                host=hcrepo_postgres.host, port=hcrepo_postgres.port,
                dbname=f"hcrepo_scratch_{uuid.uuid4().hex[:12]}",
            )
            # The janitor drops its database on exit, its open connections terminated first.
            stack.enter_context(janitor)
            return ScratchDatabase(hcrepo_postgres, janitor.dbname)

        yield make


@pytest.fixture
def hcrepo_database(hcrepo_database_factory: DatabaseFactory) -> ScratchDatabase:
    """An empty database on hcrepo_postgres, dropped after the test."""
    return hcrepo_database_factory()


# --- Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hcrepo_redis() -> Iterator[RedisServer]:
    """A started Redis shared by the session: a test that kill()s it must restart() it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def hcrepo_redis_factory() -> Iterator[RedisFactory]:
    """Start extra Redis servers (extra redis-server arguments allowed) closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(*extra_args: str) -> RedisServer:
            return stack.enter_context(RedisServer(extra_args=extra_args))

        yield start


@pytest.fixture(scope="session")
def hcrepo_redis_cluster() -> Iterator[RedisCluster]:
    """A started three-master Redis Cluster."""
    with RedisCluster() as cluster:
        yield cluster
