"""One primary connection, one transaction, the context (clinic, actor, role, break-glass)
on every statement.

BEGIN and the transaction-local `set_config` travel in the same round trip as the first
statement. After-commit hooks (cache invalidation, read-your-writes) run only once COMMIT has
succeeded. What a broken connection means depends on where it broke: before COMMIT was sent
nothing can have been committed (`ConnectionLost`, which `Database.transaction` may retry);
while COMMIT was in flight the outcome is unknown (`CommitOutcomeUnknown`, never retried).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import psycopg

from hcrepo import pipeline, tenancy
from hcrepo.crypto.keyring import Keyring
from hcrepo.driver_errors import translate
from hcrepo.errors import (
    DatabaseError,
    HcrepoError,
    InvalidContext,
    detached,
)
from hcrepo.execution import (
    commit_outcome_unknown,
    context_statement,
    ensure_open,
    fetch_lsn,
    rollback_or_close,
    run_or_translate,
    session_ended,
    stream_rows,
    timeout_statements,
)
from hcrepo.observer import Observer
from hcrepo.pipeline import PRIMARY, HcConnection, PipelineError, Statement
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.compliance.access_log import AccessLog
    from hcrepo.plan import Plan
    from hcrepo.routing.node import Node

ISOLATION_LEVELS = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


def isolation_level(isolation: object) -> str | None:
    """The SQL name of an isolation level given as `serializable`, `read committed`, …"""
    if isolation is None:
        return None
    key = isolation.lower().replace(" ", "_") if isinstance(isolation, str) else None
    if key not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION_LEVELS)}")
    return ISOLATION_LEVELS[key]


def begin_statement(isolation: str | None, read_only: bool) -> str:
    level = isolation_level(isolation)
    text = "BEGIN" if level is None else f"BEGIN ISOLATION LEVEL {level}"
    return text + (" READ ONLY" if read_only else "")


class UnitOfWork:
    """A transaction on the primary; repositories accept it as their runner.

    It belongs to the thread that opened it: a connection cannot serve two threads at once.
    """

    def __init__(
        self,
        node: Node,
        context: Context,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        on_commit: Callable[[UnitOfWork], None] | None = None,
        observer: Observer | None = None,
        keyring: Keyring,
        access: AccessLog | None = None,
    ) -> None:
        self.context = context
        self.observer = observer or Observer(slow_query_ms=0)
        self._access = access
        self._keyring = keyring
        self.read_only = read_only
        self.isolation = isolation_level(isolation)
        self.committed = False
        self.commit_lsn: str | None = None
        self.positions: tenancy.Positions = tenancy.ROOT.writes
        """The read-your-writes positions of the block the unit was opened in."""
        self._node = node
        self._begin = begin_statement(isolation, read_only)
        self._on_commit = on_commit
        self._hooks: list[Callable[[], None]] = []
        self._tags: list[str] = []
        self._streams: list[Generator[Any, None, None]] = []
        self._conn: HcConnection | None = None
        self._checkout: Any = None
        self._thread = 0
        self._begun = False
        self._savepoints = itertools.count(1)
        self._block = tenancy.Block(self._scope)

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> UnitOfWork:
        if self._thread:
            raise HcrepoError("a unit of work is entered once; open a new one")
        self._checkout = self._node.connection()
        self._conn = self._checkout.__enter__()
        self._thread = threading.get_ident()
        self._block.enter(sys._getframe(1))
        return self

    def _scope(self, outer: tenancy.Scope) -> tenancy.Scope:
        # Inside the block the unit's own context is ambient, so a `db.transaction` nested
        # in it joins only when it asks for the same one.
        self.positions = outer.writes
        return replace(outer, context=self.context, unit=self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._end(exc_type is None)
        except Exception as error:
            failure = error
        else:
            return
        raise detached(failure)  # a public boundary, like a repository call's

    def _end(self, commit: bool) -> None:
        try:
            self._close_streams()
            if commit:
                self._commit()
            else:
                self._rollback()
        finally:
            self._block.exit()
            checkout, self._checkout, self._conn = self._checkout, None, None
            checkout.__exit__(None, None, None)
        if self.committed:
            self._run_hooks()

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run `hook` once COMMIT has succeeded; never after a rollback."""
        self._hooks.append(hook)

    @property
    def keyring(self) -> Keyring:
        """The data keys of the `Database` that opened this unit."""
        return self._keyring

    @property
    def fixed_context(self) -> Context:
        """Set at BEGIN for the whole transaction: repositories cannot override it."""
        return self.context

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def joinable(self) -> bool:
        """Open, and owned by the calling thread: `Database.transaction` may run inside it."""
        return self._conn is not None and self._thread == threading.get_ident()

    def check_join(self, context: tenancy.Context, isolation: str | None,
                   read_only: bool) -> None:
        """Refuse a nested `Database.transaction` that asks for what this unit is not: it
        would otherwise run silently as this unit's clinic, actor, role, break-glass and
        options."""
        for name in ("clinic_id", "actor_id", "role", "emergency_access_id"):
            if getattr(context, name) != getattr(self.context, name):
                raise InvalidContext(
                    f"db.transaction inside an open unit of work joins it, and the unit runs "
                    f"with another {name}: run it outside the unit of work"
                )
        if isolation_level(isolation) not in (None, self.isolation):
            raise InvalidContext("db.transaction inside an open unit of work joins it, and "
                                 "the unit runs at another isolation level")
        if read_only and not self.read_only:
            raise InvalidContext("db.transaction(read_only=True) inside an open unit of work "
                                 "that can write: run it outside the unit of work")

    @property
    def token(self) -> str | None:
        """Read-your-writes token of this unit's COMMIT (see `Database.read_after`); None
        before commit and for a read-only unit."""
        return self.commit_lsn

    @property
    def backend_pid(self) -> int:
        return self._connection.info.backend_pid

    # -- running statements --------------------------------------------------------------

    def run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any:
        value = self._run(plan, args, sql)
        patients, access = plan.patients, self._access
        if patients is not None and access is not None:
            return access.seen(patients, self.context, args, value, PRIMARY)
        return value

    def _run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any:
        plan.check_context(self.context)
        conn = self._connection
        # Formatted before the statement is sent: a tag that cannot be made fails now, not
        # after COMMIT, when the cache could no longer be invalidated (reads have none).
        self._tags.extend(plan.invalidation_tags(args))
        if plan.shape.streams:
            if not self._begun:
                # BEGIN must reach the server now: a statement run before the stream is
                # first consumed would otherwise run outside the transaction and context.
                self._send([], plan)
            rows = cast(Generator[Any, None, None],
                        stream_rows(conn, plan, args, sql, [], owns_tx=False,
                                    timeout_ms=plan.query.timeout_ms))
            self._streams.append(rows)
            return self._guarded(rows, conn)
        if plan.query.timeout_ms is None:
            results = self._send([Statement(sql, args)], plan)
            return plan.shape.build(results[-1], conn.transformer, plan.name, plan.source)
        set_timeout, restore = timeout_statements(plan.query.timeout_ms)
        results = self._send([set_timeout, Statement(sql, args), restore], plan)
        return plan.shape.build(results[-2], conn.transformer, plan.name, plan.source)

    @property
    def invalidations(self) -> list[str]:
        """The `invalidates=` tags of this unit's writes, due after commit."""
        return list(self._tags)

    @contextmanager
    def savepoint(self) -> Iterator[UnitOfWork]:
        """A nested savepoint: an exception inside rolls back to it and propagates."""
        name = f"hc_sp_{next(self._savepoints)}"
        self._send([Statement(f"SAVEPOINT {name}")], None)
        saved_tags, saved_hooks = len(self._tags), len(self._hooks)
        try:
            yield self
        except BaseException:
            if self._conn is not None and not self._conn.closed:
                self._send([Statement(f"ROLLBACK TO SAVEPOINT {name}")], None)
            # What was rolled back neither invalidates nor runs its after-commit hooks.
            del self._tags[saved_tags:]
            del self._hooks[saved_hooks:]
            raise
        self._send([Statement(f"RELEASE SAVEPOINT {name}")], None)

    # -- internals -----------------------------------------------------------------------

    @property
    def _connection(self) -> HcConnection:
        conn = self._conn
        if conn is None:
            raise HcrepoError("the unit of work is not open: use 'with db.unit_of_work() as uow'")
        if self._thread != threading.get_ident():
            raise HcrepoError(
                "a unit of work belongs to the thread that opened it; open one per thread"
            )
        return conn

    def _prefix(self) -> list[Statement]:
        if self._begun:
            return []
        self._begun = True
        return [Statement(self._begin), context_statement(self.context)]

    def _send(self, statements: list[Statement], plan: Plan | None) -> list[Any]:
        conn = self._connection
        return run_or_translate(conn, [*self._prefix(), *statements],
                                plan.name if plan else None, plan.source if plan else None)

    def _guarded(self, rows: Iterator[Any], conn: HcConnection) -> Iterator[Any]:
        """Rows of a stream, refused once the unit of work has handed its connection back."""
        while True:
            if self._conn is not conn or self._thread != threading.get_ident():
                raise HcrepoError(
                    "a unit of work's stream is read in its thread, before the unit ends"
                )
            try:
                row = next(rows)
            except StopIteration:
                return
            yield row

    def _close_streams(self) -> None:
        """Close open cursors while the connection is still ours (never on a pooled one).

        A CLOSE that fails leaves its trace for COMMIT to find: an aborted transaction
        answers ROLLBACK, a dead connection fails `ensure_open`.
        """
        streams, self._streams = self._streams, []
        for rows in streams:
            with contextlib.suppress(PipelineError, psycopg.Error):
                rows.close()

    def _commit(self) -> None:
        if not self._begun:
            self.committed = True
            return
        conn = self._connection
        ensure_open(conn)  # nothing sent yet: a connection found dead here is retryable
        statements = [Statement("COMMIT")]  # the position is read before the one Sync
        if not self.read_only:
            # Always, not only after a write-classified statement: a read can write through a
            # function, and the position is what the caller's next reads must see.
            statements.append(fetch_lsn())
        try:
            results = pipeline.run(conn, statements)
        except PipelineError as failure:
            if session_ended(conn, failure.error):
                raise commit_outcome_unknown(failure.error.sqlstate, "COMMIT") from failure.error
            # The server answered COMMIT with an error (e.g. a deferred constraint or a
            # serialization failure at commit): the transaction is definitely rolled back.
            raise translate(failure.error, query="COMMIT", source="unit of work") from None
        except psycopg.OperationalError as exc:
            raise commit_outcome_unknown(exc.sqlstate, "COMMIT") from exc
        if results[0].command_status != b"COMMIT":
            # COMMIT of a transaction in the failed state answers ROLLBACK, without an error.
            raise DatabaseError(
                "25P02 in_failed_sql_transaction: COMMIT rolled back the unit of work because "
                "a statement in it failed earlier (the error was caught, not rolled back to a "
                "savepoint); nothing was committed",
                sqlstate="25P02", query="COMMIT",
            )
        self.committed = True
        if len(results) > 1:
            lsn = results[1].get_value(0, 0)
            self.commit_lsn = lsn.decode() if lsn is not None else None

    def _rollback(self) -> None:
        conn = self._conn
        if self._begun and conn is not None and not conn.closed:
            rollback_or_close(conn)

    def _run_hooks(self) -> None:
        """The runner's seam first (read-your-writes, cache), then every hook, whatever fails."""
        failure: BaseException | None = None
        hooks = [self._on_commit_seam, *self._hooks]
        for hook in hooks:
            try:
                hook()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _on_commit_seam(self) -> None:
        if self._on_commit is not None:
            self._on_commit(self)

