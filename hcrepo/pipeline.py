"""Run a short list of statements on one connection in a single network round trip.

psycopg's public `Connection.pipeline()` costs about 40% of a point read in client time; this
module drives libpq's pipeline mode directly (psycopg.pq plus psycopg's own C wait/fetch
generators): statements are named prepared statements (prepared inside the same pipeline the
first time a connection sees them; unnamed behind a pooler that cannot keep them), parameters
are dumped by psycopg's Transformer, results come back in binary, and one Sync ends the batch.
On an autocommit connection the statements before a Sync run in one implicit transaction,
which is what makes a transaction-local `set_config` plus the query cost one round trip.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq
from psycopg.abc import Buffer
from psycopg.adapt import PyFormat, Transformer

_BINARY = pq.Format.BINARY
_FATAL = pq.ExecStatus.FATAL_ERROR
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
# "cached plan must not change result type": a prepared statement whose result columns a
# schema change altered fails on every execution until it is prepared again.
_STALE_PLAN = b"0A000"


# What the access log records as the source of what the primary answered.
PRIMARY = "primary"


class Statement(NamedTuple):
    """One statement of a batch; the batch ends with one Sync (one implicit transaction)."""

    sql: str
    params: Sequence[Any] = ()
    prepare: bool = True

    def __repr__(self) -> str:
        # Parameters may be PHI, and tools that print frame locals print this repr.
        return f"Statement({self.sql!r}, <{len(self.params)} parameters>)"


class HcConnection(psycopg.Connection[Any]):
    """A pooled connection that remembers the statements it has prepared."""

    def __init__(self, pgconn: pq.abc.PGconn, row_factory: Any = None) -> None:
        if row_factory is None:
            super().__init__(pgconn)
        else:
            super().__init__(pgconn, row_factory)
        self.prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        # Names are never reused: a statement forgotten here may still exist on the server
        # (a stale plan), and one whose PREPARE failed may sit below names that are live.
        self.statement_ids = itertools.count()
        self.named_statements = True
        self.transformer = Transformer.from_context(self)
        # Who answers on this connection, as the access log records it: 'primary' or
        # 'replica:<name>', set by the node that pools it (see routing.node).
        self.served_by = "unknown"


class PipelineError(Exception):
    """A statement of the batch failed on the server; `error` is psycopg's exception for it."""

    def __init__(self, error: psycopg.Error, index: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.index = index


# What the server will answer, in order: (kind, prepared-statement key, statement index).
_PREPARE, _EXECUTE, _SYNC_REPLY = 0, 1, 2
_Reply = tuple[int, tuple[str, tuple[int, ...]] | None, int]
# dump_sequence wants one format per parameter; these lists are never mutated.
_AUTO_FORMATS = [[PyFormat.AUTO] * count for count in range(64)]


def run(conn: HcConnection, statements: Sequence[Statement]) -> list[pq.abc.PGresult]:
    """Send every statement, then read every result; return one result per statement.

    Raises `PipelineError` for the first statement the server rejected (the rest of its
    implicit transaction was skipped), after draining the pipeline so the connection is idle.
    `psycopg.OperationalError` means the connection broke.
    """
    pgconn = conn.pgconn
    transformer = conn.transformer
    replies: list[_Reply] = []
    pgconn.enter_pipeline_mode()
    try:
        for index, statement in enumerate(statements):
            values: Sequence[Buffer | None] = ()
            formats = None
            types: tuple[int, ...] = ()
            params = statement.params
            if params:
                count = len(params)
                values = transformer.dump_sequence(
                    params,
                    _AUTO_FORMATS[count] if count < 64 else [PyFormat.AUTO] * count,
                )
                types, formats = tuple(transformer.types or ()), transformer.formats
            key = (statement.sql, types)
            if statement.prepare and conn.named_statements:
                name = conn.prepared.get(key)
                if name is None:
                    name = f"hc_{next(conn.statement_ids)}".encode()
                    conn.prepared[key] = name
                    pgconn.send_prepare(name, statement.sql.encode(), param_types=types or None)
                    replies.append((_PREPARE, key, index))
                pgconn.send_query_prepared(
                    name, values, param_formats=formats, result_format=_BINARY
                )
            else:
                pgconn.send_query_params(
                    statement.sql.encode(), values, param_types=types or None,
                    param_formats=formats, result_format=_BINARY,
                )
            replies.append((_EXECUTE, key, index))
        pgconn.pipeline_sync()
        replies.append((_SYNC_REPLY, None, len(statements) - 1))
        conn.wait(generators.send(pgconn))
        return _collect(conn, replies)
    finally:
        if pgconn.status == pq.ConnStatus.OK and pgconn.pipeline_status != pq.PipelineStatus.OFF:
            try:
                pgconn.exit_pipeline_mode()
            except psycopg.Error:
                conn.close()  # a connection stuck in pipeline mode must never go back to the pool


def _collect(conn: HcConnection, replies: list[_Reply]) -> list[pq.abc.PGresult]:
    pgconn = conn.pgconn
    results: list[pq.abc.PGresult] = []
    failure: PipelineError | None = None
    for kind, key, position in replies:
        batch = conn.wait(generators.fetch_many(pgconn))
        last = batch[-1]
        status = last.status
        if kind == _SYNC_REPLY:
            if status == _FATAL:
                # The implicit transaction failed as it committed at this Sync (a deferred
                # constraint, a serialization failure, the session ending): the error comes
                # first, the Sync after it.
                failure = failure or PipelineError(_error(last, conn), position)
                conn.wait(generators.fetch_many(pgconn))
            continue
        if status in (_FATAL, _ABORTED):
            if key and (kind == _PREPARE or _stale_plan(last)):
                # Either the server holds no statement by that name, or it holds one that
                # can never run again: the next call prepares it afresh, under a new name.
                conn.prepared.pop(key, None)
            if status == _FATAL and failure is None:
                failure = PipelineError(_error(last, conn), position)
        if kind == _EXECUTE:
            results.append(last)
    if failure is not None:
        raise failure
    return results


def _stale_plan(result: pq.abc.PGresult) -> bool:
    return result.error_field(pq.DiagnosticField.SQLSTATE) == _STALE_PLAN


def _error(result: pq.abc.PGresult, conn: HcConnection) -> psycopg.Error:
    return pg_errors.error_from_result(result, encoding=conn.pgconn._encoding)
