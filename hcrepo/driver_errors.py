"""Driver errors mapped to hcrepo's hierarchy with messages that cannot carry PHI.

PostgreSQL puts row values in DETAIL ("Key (mrn)=(...) already exists", "Failing row contains
...") and data-exception messages echo the bad input, so only the SQLSTATE, its condition name,
the constraint/table/column names and — for classes whose primary message holds no values —
the primary message are kept. Callers raise the result `from None`: a chained psycopg error
would put its message, values and all, into every logged traceback.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg

from hcrepo import errors

_BY_SQLSTATE: dict[str, type[errors.DatabaseError]] = {
    "23505": errors.UniqueViolation,
    "23P01": errors.ExclusionViolation,
    "23514": errors.CheckViolation,
    "23503": errors.ForeignKeyViolation,
    "42501": errors.RowSecurityViolation,
    "40001": errors.SerializationFailure,
    "40P01": errors.SerializationFailure,
}
# Classes whose primary message names objects only, never values.
_SAFE_CLASSES = ("23", "40", "42", "25", "55", "57", "08", "53")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def translate(exc: psycopg.Error, *, query: str | None, source: str | None) -> errors.DatabaseError:
    sqlstate = exc.sqlstate
    diag = exc.diag
    name = type(exc).__name__ if isinstance(exc, pg.lookup(sqlstate or "XX000")) else "error"
    parts = [f"{sqlstate or 'no sqlstate'} {name}"]
    if sqlstate and sqlstate.startswith(_SAFE_CLASSES) and diag.message_primary:
        parts.append(diag.message_primary)
    for label, value in (("constraint", diag.constraint_name), ("table", diag.table_name),
                         ("column", diag.column_name)):
        if value:
            parts.append(f"{label} {value}")
    if sqlstate == "25006":
        parts.append("a query that writes, if only through a function it calls, needs "
                     "'-- kind: write' (reads run read-only) and a unit of work that is not "
                     "read_only")
    where = f" in {query} ({source})" if query else ""
    cls = _BY_SQLSTATE.get(sqlstate or "", errors.DatabaseError)
    message = parts[0] + (": " + "; ".join(parts[1:]) if len(parts) > 1 else "") + where
    return cls(message, sqlstate=sqlstate, query=query, constraint=diag.constraint_name)
