"""One error hierarchy for everything hcrepo raises.

Messages name queries, settings, files and nodes; they never carry parameter values,
because those may be PHI (docs/architecture.md, invariant 7).
"""

from __future__ import annotations

import itertools
import os
from types import TracebackType

# hcrepo's own source files: frames from here are hcrepo's (and hold its callers' arguments).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class HcrepoError(Exception):
    """Base of every error hcrepo raises on purpose."""


class ConfigError(HcrepoError):
    """A setting is missing or has a wrong value; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class SqlFileError(HcrepoError):
    """A .sql file or the repository method bound to it is malformed."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int,
        column: int | None = None,
        query: str | None = None,
    ) -> None:
        where = f"{path}:{line}" + (f":{column}" if column is not None else "")
        about = f" [{query}]" if query else ""
        super().__init__(f"{where}{about}: {message}")
        self.path = path
        self.line = line
        self.column = column
        self.query = query


class QueryError(HcrepoError):
    """A query ran but its result or arguments broke the declared contract."""

    def __init__(self, message: str, *, query: str, source: str) -> None:
        super().__init__(f"{query} ({source}): {message}")
        self.query = query
        self.source = source


class InvalidRow(QueryError):
    """A row failed its model's validation; the message names the fields and rules only."""


class NotFound(QueryError):
    """A method declared to return exactly one row found none."""


class TooManyRows(QueryError):
    """A method declared to return at most one row found more."""


class PageSizeExceeded(QueryError):
    """A page size above the query's cap was asked for."""


class InvalidOrderBy(QueryError):
    """An ORDER BY column outside the query's whitelist was asked for."""


class InvalidContext(HcrepoError, ValueError):
    """A clinic or actor id that is not a UUID, or a transaction asking for another clinic,
    actor or isolation than the unit of work it would join."""


class WriteOutsideUnitOfWork(HcrepoError):
    """A write through `Database` while a unit of work is open in the same block: it would
    commit on its own, and again each time the unit is retried (see `Database.autonomous`)."""


class TenantContextMissing(HcrepoError):
    """A tenant-scoped operation ran with no clinic in context."""


class ActorRequired(HcrepoError):
    """A write ran with no actor in context."""


class DatabaseError(HcrepoError):
    """A driver error surfaced through hcrepo; `sqlstate` stays reachable."""

    attempts: int = 1  # how many times `Database.transaction` ran the work

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None,
        query: str | None = None,
        constraint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.query = query
        self.constraint = constraint


class UniqueViolation(DatabaseError):
    """SQLSTATE 23505."""


class ExclusionViolation(DatabaseError):
    """SQLSTATE 23P01, e.g. a double-booked provider slot."""


class CheckViolation(DatabaseError):
    """SQLSTATE 23514."""


class ForeignKeyViolation(DatabaseError):
    """SQLSTATE 23503."""


class RowSecurityViolation(DatabaseError):
    """SQLSTATE 42501 from a row-level security policy (wrong clinic)."""


class SerializationFailure(DatabaseError):
    """SQLSTATE 40001 or 40P01 after the retries ran out."""


class ConnectionLost(DatabaseError):
    """The server connection broke before COMMIT was sent; nothing was committed."""


class CommitOutcomeUnknown(DatabaseError):
    """The connection broke while COMMIT was in flight: the write may or may not exist."""


class DecryptionFailed(HcrepoError):
    """An encrypted field could not be decrypted: bound to another clinic or row, altered, not
    a ciphertext, or sealed under a data key that is not available. Names the query, table
    and column, never the value."""


class PoolTimeout(HcrepoError):
    """No connection could be had from a pool in time."""


def detached(error: BaseException) -> BaseException:
    """`error` made fit to leave hcrepo: what it chained and hcrepo's frames are dropped.

    A driver error chained as `__cause__` or `__context__` keeps the server's message, which
    can echo a value ("invalid input syntax for type uuid: ..."), and hcrepo's frames hold the
    call's arguments, which tools that print frame locals (loguru's `diagnose`) show. Raised
    at the public boundary, outside any `except` block, the error carries neither. For an
    exception that is not hcrepo's (the application's own, passing through a callback) only
    hcrepo's frames go: its chain is the application's.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = _outside_frames(current.__traceback__)
        if isinstance(current, HcrepoError):
            current.__cause__ = None
            current.__context__ = None
            current.__suppress_context__ = True
            break
        current = current.__cause__ or current.__context__
    return error


def _outside_frames(tb: TracebackType | None) -> TracebackType | None:
    kept: list[TracebackType] = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
            kept.append(tb)
        tb = tb.tb_next
    for outer, inner in itertools.pairwise(kept):
        outer.tb_next = inner
    if kept:
        kept[-1].tb_next = None
    return kept[0] if kept else None
