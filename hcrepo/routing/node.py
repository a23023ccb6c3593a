"""One PostgreSQL server: its connection pool, its health, its circuit breaker, pool hygiene.

The pool (psycopg_pool, `HcConnection`s in autocommit: hcrepo sends BEGIN itself) opens on
first use and is rebuilt in a forked child, so gunicorn --preload and multiprocessing get
their own sockets. Standby pools connect with `default_transaction_read_only=on`: even a
replica URL that really points at a primary cannot take a write.

`Router.open` logs in to each node once before any pool exists (`admit`): a wrong URL fails
there within DB_CONNECT_TIMEOUT, with libpq's reason in one line and no password, instead of
as a pool that never fills; the same login refuses a role that would bypass row-level
security. Pool connections use DB_CONNECT_TIMEOUT as libpq's `connect_timeout`.

Every new connection verifies the server's role (`pg_is_in_recovery()`) and its start time:
a mismatch is reported once and takes the node out of routing, and a restart forgets the
cached replay position (a restarted standby may come back behind it).

Hygiene: each checkout records when and where (the caller's frames) it was taken, so pool
exhaustion raises `PoolTimeout` naming the node, the pool's stats and how long the holders
have held their connections. A checkout that fails with room left in the pool, or a
connection found lost, tries one login: when the server cannot be reached the error says so
("primary (host:port/db) unreachable: ... Connection refused"), without pool statistics.
The health monitor logs one warning, with the taker's stack, for a connection held longer
than HCREPO_POOL_LEAK_THRESHOLD. psycopg_pool's own records reach loguru through
`hcrepo.ops.driver_logs`, routed when the first node is made.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from hcrepo.config import Settings, connect_failure, server_options
from hcrepo.errors import PACKAGE_DIR, ConfigError, ConnectionLost, PoolTimeout
from hcrepo.ops import driver_logs
from hcrepo.ops.breaker import CLOSED, BreakerState, CircuitBreaker
from hcrepo.ops.counters import Counter
from hcrepo.phi.logs import logger
from hcrepo.pipeline import PRIMARY, HcConnection
from hcrepo.routing.health import NodeHealth

# The last two columns: a superuser or BYPASSRLS role is not subject to row-level security,
# where tenant isolation lives.
_ROLE_SQL = (
    "/* hcrepo:role */ SELECT pg_is_in_recovery(), pg_postmaster_start_time(), "
    "current_user::text, (SELECT rolsuper OR rolbypassrls FROM pg_roles "
    "WHERE rolname = current_user)"
)
# Frames kept per checkout for the leak warning: enough to reach application code.
_STACK_LIMIT = 16


class _Hold:
    """One checked-out connection: which pool it came from, since when, taken where.

    `frames` holds (frame, line) pairs copied at checkout when the taking frame may return
    while the connection is out (a unit of work's `__enter__`); otherwise only the taking
    frame is kept and the stack is read when needed: its callers stay suspended at their
    call lines until the connection is back, and the read path pays nothing for it.
    """

    __slots__ = ("frame", "frames", "pool", "since", "thread", "warned")

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[HcConnection],
        frame: FrameType,
        frames: list[tuple[FrameType, int]] | None,
    ) -> None:
        self.pool = pool
        self.since = time.monotonic()
        self.frame = frame
        self.frames = frames
        self.thread = threading.get_ident()
        self.warned = False

    def _lines(self) -> list[tuple[FrameType, int]]:
        if self.frames is not None:
            return self.frames
        lines: list[tuple[FrameType, int]] = []
        frame: FrameType | None = self.frame
        while frame is not None and len(lines) < _STACK_LIMIT:
            lines.append((frame, frame.f_lineno))
            frame = frame.f_back
        return lines

    def stack(self) -> str:
        summary = traceback.StackSummary.from_list(
            [(f.f_code.co_filename, line, f.f_code.co_name, None)
             for f, line in reversed(self._lines())]
        )
        return "".join(summary.format())

    def site(self) -> str:
        """The first frame outside hcrepo: the application line behind the checkout."""
        lines = self._lines()
        outside = [(f, line) for f, line in lines
                   if not f.f_code.co_filename.startswith(PACKAGE_DIR)]
        chosen = outside or lines
        if not chosen:
            return "unknown"
        frame, line = chosen[0]
        return f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"

    def thread_name(self) -> str:
        for thread in threading.enumerate():
            if thread.ident == self.thread:
                return thread.name
        return f"#{self.thread}"


def _copy_lines(frame: FrameType) -> list[tuple[FrameType, int]]:
    # Line numbers are copied now: the taking frame moves on while it holds the connection.
    lines: list[tuple[FrameType, int]] = []
    current: FrameType | None = frame
    while current is not None and len(lines) < _STACK_LIMIT:
        lines.append((current, current.f_lineno))
        current = current.f_back
    return lines


def libpq_seconds(timeout: float) -> int:
    """`timeout` as libpq's connect_timeout: whole seconds, at least 1."""
    return max(1, math.ceil(timeout))


def address(url: str) -> str:
    """host:port/dbname of a URL, without user or password: safe for logs and errors."""
    params = conninfo_to_dict(url)
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/" + str(
        params.get("dbname") or ""
    )


class Node:
    """One server and its pools; `connection()` is the checkout for units of work."""

    def __init__(
        self,
        name: str,
        url: str,
        settings: Settings,
        *,
        is_primary: bool,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.is_primary = is_primary
        # The access log's `source` of a read this node answers.
        self.served_by = PRIMARY if is_primary else f"replica:{name}"
        self.setting = "DATABASE_URL" if is_primary else "READ_REPLICA_URLS"
        self.address = address(url)
        self.health = NodeHealth(url, settings.health_timeout)
        self.breaker = self._new_breaker(settings)
        self.served = Counter()
        self.leaks = Counter()
        self._settings = settings
        self._on_change = on_change or (lambda: None)
        self._pool: psycopg_pool.ConnectionPool[HcConnection] | None = None
        self._lock = threading.Lock()
        self._holders: dict[int, _Hold] = {}
        self._down_since: float | None = None
        _nodes.add(self)
        driver_logs.route(logger)

    @staticmethod
    def _new_breaker(settings: Settings) -> CircuitBreaker:
        return CircuitBreaker(failures=settings.breaker_failures, reset=settings.breaker_reset)

    # -- the pool ------------------------------------------------------------------------

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[HcConnection]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                self._pool = self._make_pool()
            return self._pool

    def _make_pool(self) -> psycopg_pool.ConnectionPool[HcConnection]:
        s = self._settings
        kwargs: dict[str, Any] = {
            "autocommit": True, "prepare_threshold": None,
            "connect_timeout": libpq_seconds(s.db_connect_timeout),
        }
        if not self.is_primary:
            kwargs["options"] = server_options(self.url, default_transaction_read_only="on")
        pool: psycopg_pool.ConnectionPool[HcConnection] = psycopg_pool.ConnectionPool(
            self.url,
            connection_class=HcConnection,
            kwargs=kwargs,
            min_size=s.pool_min,
            max_size=s.pool_max,
            timeout=s.pool_acquire_timeout,
            max_idle=s.pool_idle_timeout,
            max_lifetime=s.pool_max_lifetime,
            max_waiting=s.pool_max_waiting,
            configure=self._configure,
            name=self.name,
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _configure(self, conn: HcConnection) -> None:
        conn.named_statements = self._settings.prepared_statements
        conn.served_by = self.served_by
        row = conn.execute(_ROLE_SQL).fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        try:
            self._refuse_privileged(role=row[2], privileged=bool(row[3]))
        except ConfigError:
            conn.close()  # the pool logs the error and never hands this login out
            raise
        self.verify_role(in_recovery=bool(row[0]), started_at=row[1])

    def admit(self, timeout: float) -> str | None:
        """Log in once, now, within `timeout`: why that failed in one line without the
        password, or None. A role that bypasses row-level security raises `ConfigError`
        naming the node's setting, unless HCREPO_ALLOW_PRIVILEGED_ROLE is on (every pool
        connection is checked the same way, for a node that could not be reached here)."""
        try:
            with psycopg.connect(
                self.url, connect_timeout=libpq_seconds(timeout), autocommit=True
            ) as conn:
                row = conn.execute(_ROLE_SQL).fetchone()
        except psycopg.OperationalError as exc:
            return connect_failure(exc, self.url)
        assert row is not None  # a SELECT without FROM returns one row
        self._refuse_privileged(role=row[2], privileged=bool(row[3]))
        return None

    def _refuse_privileged(self, *, role: str, privileged: bool) -> None:
        if privileged and not self._settings.allow_privileged_role:
            raise ConfigError(
                self.setting,
                f"{self.name} ({self.address}) logs in as {role}, a superuser or BYPASSRLS "
                "role: row-level security would not apply to it. Use hcrepo_app or a role "
                "like it (HCREPO_ALLOW_PRIVILEGED_ROLE=true permits it, for test rigs)",
            )

    def reach(self, timeout: float) -> str | None:
        """Why the server cannot be logged into now (one attempt within `timeout`), in one
        line without the password; None when it can."""
        try:
            psycopg.connect(self.url, connect_timeout=libpq_seconds(timeout)).close()
        except psycopg.OperationalError as exc:
            return connect_failure(exc, self.url)
        return None

    def explain_lost(self, error: ConnectionLost) -> None:
        """Put in front of `error`'s message that the server is unreachable, if it is."""
        failure = self.reach(self._settings.health_timeout)
        if failure is not None:
            error.args = (f"{self._unreachable(failure)}; {error.args[0]}",)

    def _unreachable(self, failure: str) -> str:
        return f"{self.name} ({self.address}) unreachable: {failure}"

    def open(self, timeout: float) -> None:
        """Fill the pool to its minimum now; `PoolTimeout` when the server does not answer."""
        try:
            self.pool.wait(timeout=timeout)
        except psycopg_pool.PoolTimeout:
            self._pool = None  # wait() closed it
            raise PoolTimeout(
                f"{self.name} ({self.address}) did not accept {self._settings.pool_min} "
                f"connections within {timeout}s"
            ) from None

    def reset_pool(self) -> None:
        """Drop the pool (connections to a server that went away are all dead); the next
        checkout builds a new one. Holders' connections are closed as they come back."""
        with self._lock:
            old, self._pool = self._pool, None
        if old is not None:
            threading.Thread(
                target=old.close, kwargs={"timeout": 1.0}, name=f"hcrepo-close-{self.name}",
                daemon=True,
            ).start()

    # -- checkout ------------------------------------------------------------------------

    def acquire(
        self,
        timeout: float | None = None,
        *,
        depth: int = 1,
        held_in_frame: bool = False,
        explain: bool = True,
    ) -> HcConnection:
        """Check a connection out; `release()` it. The taker is the frame `depth` levels up
        (1: the caller); `held_in_frame`: it releases the connection before it returns.
        `explain`: a timeout with room in the pool tries one login to say why (off where
        the error is not the caller's, as in a replica read that fails over)."""
        pool = self._pool or self.pool
        try:
            conn = pool.getconn(timeout)
        except psycopg_pool.TooManyRequests:
            raise PoolTimeout(self._exhausted(
                f"more than HCREPO_POOL_MAX_WAITING={self._settings.pool_max_waiting} "
                "callers already waiting", pool,
            )) from None
        except psycopg_pool.PoolTimeout:
            waited = self._settings.pool_acquire_timeout if timeout is None else timeout
            failure = None
            if explain and len(self._holders) < pool.max_size:
                # The pool had room, so it could not connect: say why, not how full it is.
                failure = self.reach(self._settings.health_timeout)
            raise PoolTimeout(
                self._exhausted(f"no connection within {waited}s", pool)
                if failure is None else self._unreachable(failure)
            ) from None
        except psycopg_pool.PoolClosed:
            raise ConnectionLost(
                f"{self.name}: its pool was rebuilt while waiting", sqlstate=None
            ) from None
        frame = sys._getframe(depth)
        self._holders[id(conn)] = _Hold(pool, frame, None if held_in_frame else _copy_lines(frame))
        return conn

    def release(self, conn: HcConnection) -> None:
        hold = self._holders.pop(id(conn), None)
        if hold is not None:
            hold.pool.putconn(conn)
        # else: taken before a fork, in the parent; the parent still owns the socket.

    def connection(self) -> _Checkout:
        """`with node.connection() as conn:` — a pooled connection, returned on exit."""
        return _Checkout(self)

    @property
    def in_use(self) -> int:
        return len(self._holders)

    def _exhausted(self, problem: str, pool: psycopg_pool.ConnectionPool[HcConnection]) -> str:
        stats = pool.get_stats()
        holds = sorted(tuple(self._holders.values()), key=lambda hold: hold.since)
        now = time.monotonic()
        held = ", ".join(f"{now - hold.since:.2f}s" for hold in holds[:5])
        if len(holds) > 5:
            held += f" and {len(holds) - 5} more"
        message = f"{self.name} ({self.address}): {problem}; pool stats {stats}"
        if holds:
            message += (
                f"; {len(holds)} held for {held}; the longest taken at {holds[0].site()} "
                f"(thread {holds[0].thread_name()})"
            )
        return message

    def check_leaks(self, threshold: float) -> None:
        """Warn once per checkout held longer than `threshold` seconds, with where it was taken."""
        now = time.monotonic()
        for hold in tuple(self._holders.values()):
            if not hold.warned and now - hold.since > threshold:
                hold.warned = True
                self.leaks.inc()
                logger.warning(
                    "hcrepo: a connection to {} ({}) has been held for {:.1f}s (over "
                    "HCREPO_POOL_LEAK_THRESHOLD={}s) by thread {}; it was taken at:\n{}",
                    self.name, self.address, now - hold.since, threshold, hold.thread_name(),
                    hold.stack(),
                )

    # -- health, role and breaker ----------------------------------------------------------

    @property
    def routable(self) -> bool:
        """May plain reads go here? (For replicas; the primary always takes reads last.)"""
        health = self.health
        return (
            self.breaker.state is CLOSED
            and health.up is not False  # the latest probe failed: do not wait for the breaker
            and health.role_ok
            and not health.lagging
        )

    def verify_role(self, *, in_recovery: bool, started_at: datetime | None) -> None:
        health = self.health
        if started_at != health.started_at:
            if health.started_at is not None:
                health.forget_replay()
            health.started_at = started_at
        role_ok = in_recovery != self.is_primary
        with self._lock:
            if role_ok == health.role_ok:
                return
            health.role_ok = role_ok
        if role_ok:
            logger.info("hcrepo: {} ({}) now has the role it is configured for",
                        self.name, self.address)
        elif self.is_primary:
            logger.error(
                "hcrepo: DATABASE_URL points at a standby ({} is in recovery): writes will "
                "fail until it is promoted or the setting is fixed", self.address,
            )
        else:
            logger.error(
                "hcrepo: {} in READ_REPLICA_URLS ({}) is not a standby "
                "(pg_is_in_recovery() is false): no reads are routed to it", self.name,
                self.address,
            )
        self._on_change()

    def succeeded(self) -> None:
        """A call worked. Only a closed breaker's failure count is reset here: an open one
        is closed by the monitor's trial, never by a call that started before it opened."""
        breaker = self.breaker
        if breaker.state is CLOSED:
            breaker.success()

    def failed(self, reason: str) -> None:
        """A call or a probe could not reach the server."""
        self.health.forget_replay()
        if not self.breaker.failure():
            return
        self._down_since = time.monotonic()
        logger.warning("hcrepo: circuit breaker of {} ({}) opened: {}",
                       self.name, self.address, reason)
        self.reset_pool()
        self._on_change()

    def probe_succeeded(self, timeout: float) -> None:
        """The monitor reached the server: reset blips, or run the half-open trial.

        The trial is the monitor's, not a caller's: it builds a fresh pool and takes one
        connection from it within `timeout`, so no request ever waits on a node that may
        still be down.
        """
        breaker = self.breaker
        state = breaker.state
        if state is CLOSED:
            breaker.success()
            return
        if state is BreakerState.OPEN or not breaker.allow():
            return
        try:
            conn = self.acquire(timeout, held_in_frame=True, explain=False)
        except (PoolTimeout, ConnectionLost, psycopg.Error) as exc:
            self.reset_pool()
            self.failed(f"half-open trial: {type(exc).__name__}")
            return
        self.release(conn)
        if breaker.success():
            down = time.monotonic() - (self._down_since or time.monotonic())
            logger.info("hcrepo: circuit breaker of {} ({}) closed after {:.2f}s",
                        self.name, self.address, down)
            self._on_change()

    def snapshot(self) -> dict[str, Any]:
        pool = self._pool
        return {
            "role": "primary" if self.is_primary else "replica",
            "address": self.address,
            "breaker": str(self.breaker.state),
            "routable": self.routable,
            "served": self.served.value,
            "in_use": self.in_use,
            "leaks": self.leaks.value,
            "pool": pool.get_stats() if pool is not None else None,
            **self.health.snapshot(),
        }

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self.health.probes.close()

    def _after_fork(self) -> list[Any]:
        """In a forked child: forget the parent's pools and locks (never close them here:
        closing would end the parent's sessions); return what must stay referenced."""
        inherited: list[Any] = [self._pool, *self.health.probes.forget()]
        self._pool = None
        self._lock = threading.Lock()
        self._holders = {}
        self.breaker = self._new_breaker(self._settings)
        self.health.refresh_lock_reset()
        return inherited


class _Checkout:
    __slots__ = ("_conn", "_node")

    def __init__(self, node: Node) -> None:
        self._node = node
        self._conn: HcConnection | None = None

    def __enter__(self) -> HcConnection:
        self._conn = self._node.acquire(depth=2)
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._node.release(conn)
        if isinstance(exc, ConnectionLost):
            self._node.explain_lost(exc)


_nodes: weakref.WeakSet[Node] = weakref.WeakSet()
# The parent's pools and sockets, kept referenced in a forked child so that no finalizer
# ever runs on them there.
_inherited: list[Any] = []


def _forget_parent_pools() -> None:
    for node in list(_nodes):
        _inherited.extend(node._after_fork())


os.register_at_fork(after_in_child=_forget_parent_pools)
