"""Helpers of the routing, failover and pool tests (fixtures: tests/routing_fixtures.py).

`Cluster` is a database of its own (`hcrepo_routing`) on the session's primary and its two
streaming replicas, with one table and the repository of tests/sql/routing.sql. The replicas
are shared by the whole session, so every helper here that pauses replay or stops a replica
undoes it in a `finally` and waits until the replica has caught up again.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from loguru import logger
from pydantic import BaseModel

from hcrepo import Database, Repository, Settings, query, tenancy
from hcrepo.routing.node import Node
from hcrepo.testing import PostgresServer
from tests.plugins.servers import WaitReplayed
from tests.support.wire import Relay

DBNAME = "hcrepo_routing"
TABLE = "CREATE TABLE IF NOT EXISTS routing_items (id bigserial PRIMARY KEY, note text NOT NULL)"


class Found(BaseModel):
    port: int
    note: str | None


class Routing(Repository, sql="../sql/routing.sql", tenant=False):
    @query("where_am_i")
    def where_am_i(self) -> int: ...

    @query("find_note")
    def find_note(self, *, id: int) -> Found: ...

    @query("add_note")
    def add_note(self, *, note: str) -> int: ...

    @query("add_bulk")
    def add_bulk(self, *, count: int) -> int: ...

    @query("slow_where_am_i")
    def slow_where_am_i(self, *, seconds: float) -> int: ...


@dataclass
class Cluster:
    primary: PostgresServer
    replicas: list[PostgresServer]
    wait_replayed: WaitReplayed
    opened: list[Database] = field(default_factory=list)

    def url(self, server: PostgresServer, dbname: str = DBNAME) -> str:
        return server.url(user="postgres", password=server.superuser_password, dbname=dbname)

    @property
    def replica_urls(self) -> list[str]:
        return [self.url(replica) for replica in self.replicas]

    def settings(self, **overrides: Any) -> Settings:
        options: dict[str, Any] = {
            "database_url": self.url(self.primary),
            "read_replica_urls": self.replica_urls,
            "redis_url": "",
            "pool_min": 1,
            "pool_max": 10,
            # The monitor thread stays out of the way; tests run cycles with check_now().
            "health_interval": 60.0,
            # The cluster's nodes are reached as the superuser (no application role here).
            "allow_privileged_role": True,
            **overrides,
        }
        return Settings(**options)

    def database(self, **overrides: Any) -> Database:
        """An opened Database (closed after the test) on this cluster."""
        db = Database(self.settings(**overrides))
        db.open()
        self.opened.append(db)
        return db

    def catch_up(self) -> None:
        for replica in self.replicas:
            self.wait_replayed(replica)

    def superuser(self, server: PostgresServer) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(server), autocommit=True, connect_timeout=10)

    @contextlib.contextmanager
    def replay_paused(self, *replicas: PostgresServer) -> Iterator[None]:
        """Replay stopped on `replicas` for the block (WAL still arrives, nothing applies)."""
        try:
            for replica in replicas:
                with self.superuser(replica) as conn:
                    conn.execute("SELECT pg_wal_replay_pause()")
                    until(lambda c=conn: _pause_state(c) == "paused", "replay to pause")
            yield
        finally:
            for replica in replicas:
                if replica.is_running():
                    with self.superuser(replica) as conn:
                        conn.execute("SELECT pg_wal_replay_resume()")
            self.catch_up()

    @contextlib.contextmanager
    def stopped(self, replica: PostgresServer) -> Iterator[None]:
        """The replica crashes (`pg_ctl stop -m immediate`) for the block, then restarts."""
        try:
            replica.stop(mode="immediate")
            yield
        finally:
            replica.start()
            self.wait_replayed(replica)

    def close(self) -> None:
        for db in self.opened:
            db.close()
        self.opened.clear()


def _pause_state(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
    return str(row[0]) if row else ""


def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `condition` (bounded) for states the servers reach on their own."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(pause)
        pause = min(pause * 2, 0.05)


def pool_settled(node: Node) -> bool:
    """No connection of `node`'s pool is being opened (or checked out): only callers can
    make it talk to its server now."""
    stats = node.pool.get_stats()
    return stats["pool_available"] == stats["pool_size"]


def ports(db: Database, reads: int) -> collections.Counter[int]:
    """Which servers answered `reads` plain reads made outside every block (no token)."""
    with tenancy.Block(lambda outer: tenancy.ROOT):
        return collections.Counter(Routing(db).where_am_i() for _ in range(reads))


class LogSink:
    """loguru messages at or above `level` from hcrepo, with an event per awaited phrase."""

    def __init__(self, level: str) -> None:
        self.messages: list[str] = []
        self._watch: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._id = logger.add(self._write, level=level, format="{level}: {message}")

    def _write(self, message: Any) -> None:
        text = str(message)
        with self._lock:
            self.messages.append(text)
            for phrase, event in self._watch:
                if phrase in text:
                    event.set()

    def event(self, phrase: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._watch.append((phrase, event))
            if any(phrase in text for text in self.messages):
                event.set()
        return event

    def matching(self, *phrases: str) -> list[str]:
        with self._lock:
            return [text for text in self.messages if all(p in text for p in phrases)]

    def close(self) -> None:
        logger.remove(self._id)


class SlowRelay(Relay):
    """A relay that holds every client chunk for `delay` seconds: a farther-away server."""

    def __init__(self, target_url: str, delay: float) -> None:
        self.delay = delay
        super().__init__(target_url)

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        target: Any = _Delayed(sink, self.delay) if direction == "c" else sink
        super()._pump(source, target, direction)


class _Delayed:
    def __init__(self, sock: socket.socket, delay: float) -> None:
        self._sock = sock
        self._delay = delay

    def sendall(self, data: bytes) -> None:
        time.sleep(self._delay)  # simulated network distance, not test synchronisation
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
