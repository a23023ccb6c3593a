"""Throw-away servers for tests, the demo and the benchmarks, and a pytest plugin.

Holds a PostgreSQL primary with streaming replicas, Redis, a three-node Redis Cluster and
PgBouncer, each on a free loopback port in its own temporary directory and gone after
`close()`; `hcrepo.testing.plugin` gives them to a test suite as fixtures. It may import the
core `hcrepo` modules; the core never imports it (`hcrepo demo` does, inside the command).
Needs the `testing` extra.
"""

from __future__ import annotations

try:
    # The extra's marker: without it the plugin cannot work, so nothing here is offered.
    import pytest_postgresql  # noqa: F401
except ImportError:
    raise ImportError(
        "hcrepo.testing needs the testing extra: pip install 'hcrepo[testing]'",
        name=__name__,
    ) from None

from hcrepo.testing.binaries import MIN_PG_MAJOR, PG_BINARIES, pg_bindir
from hcrepo.testing.errors import EmbeddedServerError
from hcrepo.testing.pgbouncer import PgBouncer
from hcrepo.testing.ports import free_port
from hcrepo.testing.postgres import PostgresServer, wait_for_replay
from hcrepo.testing.processes import SERVICE_USER
from hcrepo.testing.redis import RedisCluster, RedisServer

__all__ = [
    "MIN_PG_MAJOR",
    "PG_BINARIES",
    "SERVICE_USER",
    "EmbeddedServerError",
    "PgBouncer",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "free_port",
    "pg_bindir",
    "wait_for_replay",
]
