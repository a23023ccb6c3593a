"""Which server answers: the primary for writes and units of work, a replica for plain reads.

Each node owns one psycopg_pool.ConnectionPool of `HcConnection`s in autocommit mode (hcrepo
sends BEGIN itself, pipelined with the first statement). Pools open lazily and are rebuilt in
a forked child, so gunicorn --preload and multiprocessing get their own sockets.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg_pool

from hcrepo.config import Settings
from hcrepo.errors import ConnectionLost, PoolTimeout
from hcrepo.pipeline import HcConnection

R = TypeVar("R")


class Node:
    """One PostgreSQL server and its pool."""

    def __init__(self, name: str, url: str, settings: Settings, *, is_primary: bool) -> None:
        self.name = name
        self.url = url
        self.is_primary = is_primary
        self._settings = settings
        self._pool: psycopg_pool.ConnectionPool[HcConnection] | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[HcConnection]:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # A forked child must never share the parent's sockets: drop them unclosed.
                self._pid = os.getpid()
                self._pool = self._make_pool()
            return self._pool

    def _make_pool(self) -> psycopg_pool.ConnectionPool[HcConnection]:
        s = self._settings
        pool = psycopg_pool.ConnectionPool(
            self.url,
            connection_class=HcConnection,
            kwargs={"autocommit": True, "prepare_threshold": None},
            min_size=s.pool_min,
            max_size=s.pool_max,
            timeout=s.pool_acquire_timeout,
            max_idle=s.pool_idle_timeout,
            max_lifetime=s.pool_max_lifetime,
            max_waiting=s.pool_max_waiting,
            name=self.name,
            open=False,
        )
        pool.open(wait=False)
        return pool

    @contextmanager
    def connection(self) -> Iterator[HcConnection]:
        try:
            conn = self.pool.getconn()
        except psycopg_pool.PoolTimeout:
            stats = self.pool.get_stats()
            raise PoolTimeout(
                f"no connection from {self.name} within {self._settings.pool_acquire_timeout}s "
                f"(pool stats: {stats})"
            ) from None
        try:
            yield conn
        finally:
            self.pool.putconn(conn)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None


class Router:
    def __init__(self, settings: Settings) -> None:
        self.primary = Node("primary", settings.database_url, settings, is_primary=True)
        self.replicas = [
            Node(f"replica{i}", url, settings, is_primary=False)
            for i, url in enumerate(settings.read_replica_urls, start=1)
        ]
        self._turn = itertools.cycle(range(max(1, len(self.replicas))))

    def reader(self) -> Node:
        if not self.replicas:
            return self.primary
        return self.replicas[next(self._turn)]

    def read(self, attempt: Callable[[HcConnection], R]) -> R:
        """Run an idempotent read on a reader node; a lost connection is retried once."""
        for retry in (False, True):
            node = self.primary if retry else self.reader()
            try:
                with node.connection() as conn:
                    return attempt(conn)
            except ConnectionLost:
                if retry:
                    raise
        raise AssertionError("unreachable")

    def record_write(self, lsn: str) -> None:
        """A commit at `lsn` happened in the current context (read-your-writes)."""

    def close(self) -> None:
        for node in (self.primary, *self.replicas):
            node.close()
