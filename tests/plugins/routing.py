"""Fixtures for the routing, failover and pool tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from hcrepo.testing import PostgresServer
from tests.plugins.servers import WaitReplayed
from tests.support.routing import DBNAME, TABLE, Cluster, LogSink


@pytest.fixture(scope="session")
def routing_schema(
    pg_primary: PostgresServer, pg_replicas: list[PostgresServer], wait_replayed: WaitReplayed
) -> None:
    with psycopg.connect(pg_primary.superuser_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DBNAME]).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {DBNAME}")
    with psycopg.connect(
        pg_primary.url(password=pg_primary.superuser_password, dbname=DBNAME), autocommit=True
    ) as conn:
        conn.execute(TABLE)
        conn.execute("INSERT INTO routing_items (note) VALUES ('seed')")
    for replica in pg_replicas:
        wait_replayed(replica)


@pytest.fixture
def cluster(
    routing_schema: None,
    pg_primary: PostgresServer,
    pg_replicas: list[PostgresServer],
    wait_replayed: WaitReplayed,
) -> Iterator[Cluster]:
    made = Cluster(pg_primary, list(pg_replicas), wait_replayed)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def log_sink() -> Iterator[Callable[[str], LogSink]]:
    sinks: list[LogSink] = []

    def make(level: str = "INFO") -> LogSink:
        sinks.append(LogSink(level))
        return sinks[-1]

    yield make
    for sink in sinks:
        sink.close()
