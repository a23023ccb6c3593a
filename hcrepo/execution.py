"""Statements every runner shares: the tenant/actor prefix, the commit LSN, streamed reads."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from hcrepo import pipeline
from hcrepo.driver_errors import translate
from hcrepo.errors import ConnectionLost
from hcrepo.pipeline import HcConnection, PipelineError, Statement
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.repository import Plan

_SET_CONTEXT = (
    "SELECT set_config('app.clinic_id', $1, true), set_config('app.actor_id', $2, true)"
)
_SET_CONTEXT_TIMEOUT = _SET_CONTEXT + ", set_config('statement_timeout', $3, true)"
STREAM_CHUNK = 2000
_cursor_ids = itertools.count(1)


def context_statement(context: Context, timeout_ms: int | None = None) -> Statement:
    """Transaction-local clinic and actor ('' = none, so RLS fails closed), always sent."""
    if timeout_ms is None:
        return Statement(_SET_CONTEXT, context.settings)
    return Statement(_SET_CONTEXT_TIMEOUT, (*context.settings, str(timeout_ms)))


def fetch_lsn() -> Statement:
    """The primary's WAL insert position, read after COMMIT in the same round trip."""
    return Statement("SELECT pg_current_wal_insert_lsn()::text")


def run_or_translate(
    conn: HcConnection, statements: list[Statement], plan: Plan
) -> list[Any]:
    try:
        return pipeline.run(conn, statements)
    except PipelineError as failure:
        raise translate(failure.error, query=plan.name, source=plan.source) from failure.error
    except psycopg.OperationalError as exc:
        raise ConnectionLost(
            f"connection lost running {plan.name} ({plan.source})", sqlstate=exc.sqlstate,
            query=plan.name,
        ) from exc


def stream_rows(
    conn: HcConnection,
    plan: Plan,
    args: tuple[Any, ...],
    sql: str,
    prefix: list[Statement],
    *,
    owns_tx: bool,
) -> Iterator[Any]:
    """Rows of a server-side cursor, fetched in chunks so memory stays flat.

    `owns_tx`: the caller has no transaction open, so BEGIN/COMMIT wrap the cursor here.
    """
    cursor = f"hc_cursor_{next(_cursor_ids)}"
    fetch = Statement(f"FETCH FORWARD {STREAM_CHUNK} FROM {cursor}")
    first = [
        *prefix,
        Statement(f"DECLARE {cursor} NO SCROLL CURSOR FOR {sql}", args, prepare=False),
        fetch,
    ]
    transformer = conn.transformer
    results = run_or_translate(conn, first, plan)
    finished = False
    try:
        while True:
            chunk = results[-1]
            yield from plan.shape.build(chunk, transformer, plan.name, plan.source)
            if chunk.ntuples < STREAM_CHUNK:
                break
            results = run_or_translate(conn, [fetch], plan)
        finished = True
    finally:
        if not conn.closed:
            closing = [Statement(f"CLOSE {cursor}", prepare=False)]
            if owns_tx:
                closing.append(Statement("COMMIT" if finished else "ROLLBACK"))
            pipeline.run(conn, closing)
