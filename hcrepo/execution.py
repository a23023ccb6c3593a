"""Statements every runner shares: the context prefix, the commit LSN, streamed reads."""

from __future__ import annotations

import contextlib
import itertools
import select
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from hcrepo import pipeline
from hcrepo.driver_errors import translate
from hcrepo.errors import CommitOutcomeUnknown, ConnectionLost
from hcrepo.pipeline import HcConnection, PipelineError, Statement
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.plan import Plan

# One statement, so the staff role and a break-glass cost no round trip of their own.
_SET_CONTEXT = (
    "SELECT set_config('app.clinic_id', $1, true), set_config('app.actor_id', $2, true),"
    " set_config('app.role', $3, true), set_config('app.emergency_reason', $4, true),"
    " set_config('app.emergency_access_id', $5, true)"
)
# A read cannot write, whatever it calls: a VOLATILE function that inserts fails with 25006
# instead of committing behind a query that failover and cache fills may run twice.
_READ_ONLY = ", set_config('transaction_read_only', 'on', true)"
_TIMEOUT = ", set_config('statement_timeout', $6, true)"
_CONTEXT_TEXTS = {
    (read_only, timed): "".join(
        (_SET_CONTEXT, _READ_ONLY if read_only else "", _TIMEOUT if timed else "")
    )
    for read_only in (False, True) for timed in (False, True)
}
STREAM_CHUNK = 2000
# The server ends the session: admin_shutdown (pg_terminate_backend), crash_shutdown,
# cannot_connect_now. Class 08 is connection_exception.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
# Rounds of reading what the server sent unasked before COMMIT (notices, a FATAL, EOF).
_PREFLIGHT_READS = 8
_cursor_ids = itertools.count(1)


def context_statement(
    context: Context, timeout_ms: int | None = None, *, read_only: bool = False
) -> Statement:
    """Transaction-local clinic, actor, role and break-glass ('' = none, so RLS fails
    closed), always sent;
    `read_only` makes the rest of the implicit transaction unable to write."""
    if timeout_ms is None:
        return Statement(_CONTEXT_TEXTS[read_only, False], context.settings)
    return Statement(_CONTEXT_TEXTS[read_only, True], (*context.settings, str(timeout_ms)))


def fetch_lsn() -> Statement:
    """The primary's WAL insert position, read after COMMIT in the same round trip."""
    return Statement("SELECT pg_current_wal_insert_lsn()::text")


def timeout_statements(timeout_ms: int) -> tuple[Statement, Statement]:
    """A `-- timeout:` inside an open transaction: set it for one statement, then restore."""
    return (
        Statement("SELECT set_config('statement_timeout', $1, true)", (str(timeout_ms),)),
        Statement("SET LOCAL statement_timeout TO DEFAULT"),
    )


def session_ended(conn: HcConnection, error: psycopg.Error | None = None) -> bool:
    """True when the connection is gone, or the server said it is ending the session."""
    sqlstate = error.sqlstate if error is not None else None
    return conn.closed or bool(
        sqlstate and (sqlstate.startswith("08") or sqlstate in _SESSION_ENDED)
    )


def ensure_open(conn: HcConnection, *, before: str = "COMMIT", query: str | None = None) -> None:
    """Raise `ConnectionLost` if the server has already closed `conn`, without sending a byte.

    A terminated backend sends a FATAL and closes its socket while the client is idle; reading
    what is already there (non-blocking) tells "died before we sent anything" apart from
    "died while our statement was in flight", which is what decides whether a COMMIT (or an
    autocommit write) may be retried.
    """
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    try:
        for _ in range(_PREFLIGHT_READS):
            if not poller.poll(0):
                break
            conn.pgconn.consume_input()
    except psycopg.OperationalError as exc:
        raise connection_lost(exc, query, before) from exc
    if conn.closed:
        raise connection_lost(None, query, before)


def connection_lost(
    error: psycopg.Error | None, query: str | None, before: str = "COMMIT"
) -> ConnectionLost:
    return ConnectionLost(
        f"connection lost before {before} was sent; nothing was committed",
        sqlstate=error.sqlstate if error is not None else None, query=query,
    )


def commit_outcome_unknown(sqlstate: str | None, query: str) -> CommitOutcomeUnknown:
    """The connection broke while a COMMIT (explicit, or a Sync's implicit one) was in flight."""
    return CommitOutcomeUnknown(
        f"connection lost while {query} was committing: it may or may not have been "
        "committed; check before repeating it",
        sqlstate=sqlstate, query=query,
    )


def rollback_or_close(conn: HcConnection) -> None:
    """ROLLBACK; a connection that cannot be rolled back is closed instead, so the pool
    discards it (the server rolls back on disconnect)."""
    try:
        pipeline.run(conn, [Statement("ROLLBACK")])
    except (PipelineError, psycopg.Error):
        conn.close()


def end_failed_transaction(conn: HcConnection) -> None:
    """Roll back an explicit transaction a failed batch left aborted, before the connection
    goes back to the pool."""
    if not conn.closed and conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        rollback_or_close(conn)


def run_or_translate(
    conn: HcConnection,
    statements: list[Statement],
    query: str | None,
    source: str | None,
    *,
    before: str = "COMMIT",
) -> list[Any]:
    """`pipeline.run` with errors in hcrepo's terms: a connection that broke or a session the
    server ended is `ConnectionLost` (`before`: what had not been sent yet); a statement the
    server refused raises its typed error."""
    try:
        return pipeline.run(conn, statements)
    except PipelineError as failure:
        if session_ended(conn, failure.error):
            raise connection_lost(failure.error, query, before) from failure.error
        raise translate(failure.error, query=query, source=source) from None
    except psycopg.OperationalError as exc:
        raise connection_lost(exc, query, before) from exc


def stream_rows(
    conn: HcConnection,
    plan: Plan,
    args: tuple[Any, ...],
    sql: str,
    prefix: list[Statement],
    *,
    owns_tx: bool,
    timeout_ms: int | None = None,
) -> Iterator[Any]:
    """Rows of a server-side cursor, fetched in chunks so memory stays flat.

    `owns_tx`: the caller has no transaction open, so BEGIN/COMMIT wrap the cursor here.
    `timeout_ms`: a `-- timeout:` applied to each round trip of the cursor (inside a unit
    of work, where it cannot be set for the whole transaction).
    """
    cursor = f"hc_cursor_{next(_cursor_ids)}"
    # Cursor names are unique, so preparing their statements would only pile them up.
    batch = [Statement(f"FETCH FORWARD {STREAM_CHUNK} FROM {cursor}", prepare=False)]
    declare = Statement(f"DECLARE {cursor} NO SCROLL CURSOR FOR {sql}", args, prepare=False)
    if timeout_ms is not None:
        set_timeout, restore = timeout_statements(timeout_ms)
        batch = [set_timeout, *batch, restore]
    chunk_at = -2 if timeout_ms is not None else -1
    transformer = conn.transformer
    try:
        results = run_or_translate(conn, [*prefix, declare, *batch], plan.name, plan.source)
        while True:
            chunk = results[chunk_at]
            yield from plan.shape.build(chunk, transformer, plan.name, plan.source)
            if chunk.ntuples < STREAM_CHUNK:
                break
            results = run_or_translate(conn, batch, plan.name, plan.source)
    except BaseException:
        _abandon_cursor(conn, cursor, owns_tx)
        raise
    closing = [Statement(f"CLOSE {cursor}", prepare=False)]
    if owns_tx:
        closing.append(Statement("COMMIT"))
    run_or_translate(conn, closing, plan.name, plan.source)


def _abandon_cursor(conn: HcConnection, cursor: str, owns_tx: bool) -> None:
    """Clean up after a stream that failed or was dropped, without hiding why: a cleanup that
    fails closes the connection (the pool discards it) rather than raise over the cause."""
    if conn.closed:
        return
    if owns_tx:
        rollback_or_close(conn)
    elif conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.INERROR:
        # Inside a unit of work: a CLOSE that fails leaves the transaction aborted, which
        # the unit's COMMIT reports; when it is aborted already, its rollback ends the cursor.
        with contextlib.suppress(PipelineError, psycopg.Error):
            pipeline.run(conn, [Statement(f"CLOSE {cursor}", prepare=False)])
