"""One primary connection, one transaction, the clinic and actor on every statement.

BEGIN and the transaction-local `set_config` travel in the same round trip as the first
statement. After-commit hooks (cache invalidation, read-your-writes) run only once COMMIT has
succeeded. A connection that broke while COMMIT was in flight raises `CommitOutcomeUnknown`;
one that broke earlier raises `ConnectionLost`, which `Database.transaction` may retry.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg

from hcrepo import pipeline
from hcrepo.driver_errors import translate
from hcrepo.errors import CommitOutcomeUnknown, ConnectionLost, HcrepoError
from hcrepo.execution import context_statement, fetch_lsn, stream_rows
from hcrepo.pipeline import HcConnection, PipelineError, Statement
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.repository import Plan
    from hcrepo.routing import Node

ISOLATION_LEVELS = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}

open_unit: contextvars.ContextVar[UnitOfWork | None] = contextvars.ContextVar(
    "hcrepo_unit_of_work", default=None
)


def begin_statement(isolation: str | None, read_only: bool) -> str:
    text = "BEGIN"
    if isolation is not None:
        key = isolation.lower().replace(" ", "_")
        if key not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_LEVELS)}")
        text += f" ISOLATION LEVEL {ISOLATION_LEVELS[key]}"
    return text + (" READ ONLY" if read_only else "")


class UnitOfWork:
    """A transaction on the primary; repositories accept it as their runner."""

    def __init__(
        self,
        node: Node,
        context: Context,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        on_commit: Callable[[UnitOfWork], None] | None = None,
        track_lsn: bool = False,
    ) -> None:
        self.context = context
        self.read_only = read_only
        self.wrote = False
        self.commit_lsn: str | None = None
        self._node = node
        self._begin = begin_statement(isolation, read_only)
        self._track_lsn = track_lsn
        self._on_commit = on_commit
        self._hooks: list[Callable[[], None]] = []
        self._tags: list[tuple[Plan, tuple[Any, ...]]] = []
        self._conn: HcConnection | None = None
        self._checkout: Any = None
        self._begun = False
        self._savepoints = itertools.count(1)
        self._token: contextvars.Token[UnitOfWork | None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> UnitOfWork:
        self._checkout = self._node.connection()
        self._conn = self._checkout.__enter__()
        self._token = open_unit.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                self._rollback()
        finally:
            if self._token is not None:
                open_unit.reset(self._token)
            checkout, self._checkout, self._conn = self._checkout, None, None
            checkout.__exit__(None, None, None)
        if exc_type is None:
            for hook in self._hooks:
                hook()
            if self._on_commit is not None:
                self._on_commit(self)

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run `hook` once COMMIT has succeeded; never after a rollback."""
        self._hooks.append(hook)

    @property
    def backend_pid(self) -> int:
        return self._connection.info.backend_pid

    # -- running statements --------------------------------------------------------------

    def run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any:
        plan.check_context(self.context)
        if plan.is_write:
            self.wrote = True
            if plan.invalidates:
                self._tags.append((plan, args))
        if plan.shape.streams:
            return stream_rows(self._connection, plan, args, sql, self._prefix(), owns_tx=False)
        results = self._send([Statement(sql, args)], plan)
        return plan.shape.build(results[-1], self._connection.transformer, plan.name, plan.source)

    @property
    def invalidations(self) -> list[tuple[Plan, tuple[Any, ...]]]:
        """Write plans (with arguments) whose `invalidates=` tags are due after commit."""
        return list(self._tags)

    @contextmanager
    def savepoint(self) -> Iterator[UnitOfWork]:
        """A nested savepoint: an exception inside rolls back to it and propagates."""
        name = f"hc_sp_{next(self._savepoints)}"
        self._send([Statement(f"SAVEPOINT {name}")], None)
        saved_tags = len(self._tags)
        try:
            yield self
        except BaseException:
            if self._conn is not None and not self._conn.closed:
                self._send([Statement(f"ROLLBACK TO SAVEPOINT {name}")], None)
            del self._tags[saved_tags:]
            raise
        self._send([Statement(f"RELEASE SAVEPOINT {name}")], None)

    # -- internals -----------------------------------------------------------------------

    @property
    def _connection(self) -> HcConnection:
        if self._conn is None:
            raise HcrepoError("the unit of work is not open: use 'with db.unit_of_work() as uow'")
        return self._conn

    def _prefix(self) -> list[Statement]:
        if self._begun:
            return []
        self._begun = True
        return [Statement(self._begin), context_statement(self.context)]

    def _send(self, statements: list[Statement], plan: Plan | None) -> list[Any]:
        prefix = self._prefix()
        try:
            return pipeline.run(self._connection, [*prefix, *statements])
        except PipelineError as failure:
            raise translate(failure.error, query=plan.name if plan else None,
                            source=plan.source if plan else None) from failure.error
        except psycopg.OperationalError as exc:
            raise ConnectionLost(
                "connection lost before COMMIT was sent; nothing was committed",
                sqlstate=exc.sqlstate, query=plan.name if plan else None,
            ) from exc

    def _commit(self) -> None:
        if not self._begun:
            return
        conn = self._connection
        statements = [Statement("COMMIT", sync_after=True)]
        if self._track_lsn and self.wrote:
            statements.append(fetch_lsn())
        try:
            results = pipeline.run(conn, statements)
        except PipelineError as failure:
            # The server answered COMMIT with an error (e.g. a deferred constraint or a
            # serialization failure at commit): the transaction is definitely rolled back.
            raise translate(failure.error, query="COMMIT", source="unit of work") from failure.error
        except psycopg.OperationalError as exc:
            raise CommitOutcomeUnknown(
                "connection lost while COMMIT was in flight: the transaction may or may not "
                "have been committed; check before repeating it",
                sqlstate=exc.sqlstate,
            ) from exc
        if len(results) > 1:
            lsn = results[1].get_value(0, 0)
            self.commit_lsn = lsn.decode() if lsn is not None else None

    def _rollback(self) -> None:
        conn = self._conn
        if not self._begun or conn is None or conn.closed:
            return
        try:
            pipeline.run(conn, [Statement("ROLLBACK")])
        except (PipelineError, psycopg.OperationalError):
            conn.close()  # the pool discards it; the server rolls back on disconnect
