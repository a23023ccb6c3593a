"""`hcrepo check`: every repository query prepared against a live database, as the app sees it.

For each plan of each loaded `Repository` subclass the statement (every ORDER BY variant) is
PREPAREd and described through libpq: the result columns' names, types and — for plain table
columns — NOT NULL constraints are compared with the declared row model or scalar, and the
parameter types with the method signature. Every tenant table (one with `clinic_id`) a query
touches must have row-level security enabled and forced, and the connected role must hold the
table privileges the statement needs (PREPARE itself checks none). A cached query declared
independent of a policy input (`@cached(independent_of=("actor_id",))`) must not touch a table
whose row-level security policies read that setting (`app.actor_id`); a policy that reads it
only through a function or a view is not seen. `SELECT *` and list reads without LIMIT are
linted. Schema drift thus fails CI instead of production.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import importlib
import re
import types
import typing
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import psycopg
from pglast import ast, parser, visitors
from psycopg import errors as pg_errors
from psycopg import pq
from pydantic import BaseModel

from hcrepo import sqlfile
from hcrepo.admin.connect import connect
from hcrepo.errors import ConfigError
from hcrepo.plan import Plan, type_name
from hcrepo.repository import Repository, reads_setting
from hcrepo.results import Many, OneOrNone, Stream, without_none

Severity = Literal["error", "warning"]

# Built-in type names -> what psycopg loads them as (binary results).
_PYTHON_TYPES: dict[str, Any] = {
    "bool": bool, "int2": int, "int4": int, "int8": int, "oid": int,
    "float4": float, "float8": float, "numeric": decimal.Decimal,
    "text": str, "varchar": str, "bpchar": str, "name": str, "citext": str,
    "uuid": uuid.UUID, "date": datetime.date, "time": datetime.time, "timetz": datetime.time,
    "timestamp": datetime.datetime, "timestamptz": datetime.datetime,
    "interval": datetime.timedelta, "bytea": bytes, "json": Any, "jsonb": Any,
}

_TYPE_SQL = """
SELECT t.typname, t.typtype, t.typcategory, t.typelem, t.typbasetype
FROM pg_type t WHERE t.oid = %s
"""
_RELATION_SQL = """
SELECT c.oid, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
       EXISTS (SELECT FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = 'clinic_id' AND NOT a.attisdropped)
FROM pg_class c WHERE c.oid = to_regclass(%s)
"""
_NOT_NULL_SQL = """
SELECT c.relname, a.attname, a.attnotnull
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE a.attrelid = %s AND a.attnum = %s
"""
# A view's definition and the relations it reads (its rewrite rule's dependencies).
_VIEW_SQL = """
SELECT pg_get_viewdef(c.oid), array(
    SELECT DISTINCT d.refobjid::regclass::text
    FROM pg_rewrite r
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> c.oid
    WHERE r.ev_class = c.oid ORDER BY 1)
FROM pg_class c WHERE c.oid = %s AND c.relkind = 'v'
"""
_ATTNUM_SQL = """
SELECT a.attnum FROM pg_attribute a
WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped
"""
_PRIVILEGE_SQL = """
SELECT has_table_privilege(%(oid)s, %(privilege)s)
    OR (%(privilege)s <> 'DELETE' AND has_any_column_privilege(%(oid)s, %(privilege)s))
"""
_POLICIES_SQL = """
SELECT p.policyname, p.qual, p.with_check
FROM pg_policies p
JOIN pg_namespace n ON n.nspname = p.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
WHERE c.oid = %s
ORDER BY p.policyname
"""
_ROLE_SQL = """
SELECT current_user::text, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user
"""


class Finding(NamedTuple):
    """One problem, located in a `.sql` file (or `<database>` for the connection itself)."""

    path: str
    line: int
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.severity}: {self.message}"


def repositories(modules: Iterable[str] = ()) -> list[type[Repository]]:
    """Every loaded Repository subclass bound to a SQL file, after importing `modules`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ConfigError("--module", f"cannot import {name} ({exc.msg})") from None
    found: list[type[Repository]] = []
    pending = list(Repository.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if "__plans__" in vars(cls) and cls not in found:
            found.append(cls)
    return found


def run_check(
    url: str, classes: Iterable[type[Repository]] | None = None, *, setting: str = "--database"
) -> list[Finding]:
    """Check `classes` (default: every loaded repository) against the database at `url`;
    a connection failure is a ConfigError naming `setting`, where the URL came from."""
    targets = repositories() if classes is None else list(classes)
    with connect(url, setting, autocommit=True) as conn:
        checker = _Checker(conn)
        for cls in targets:
            for attribute, plan in cls.__plans__.items():
                checker.check(cls, attribute, plan)
        return sorted(checker.findings, key=lambda f: (f.path, f.line, f.message))


class _Report(Protocol):
    def __call__(self, severity: Severity, message: str, line: int | None = None) -> None: ...


class _Column(NamedTuple):
    name: str
    type_oid: int
    table_oid: int
    table_column: int


class _Checker:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.findings: list[Finding] = []
        self._types: dict[int, Any] = {}
        self._prepared = 0
        self._relations: dict[str, tuple[Any, ...] | None] = {}
        role, bypasses = conn.execute(_ROLE_SQL).fetchone() or ("?", False)
        if bypasses:
            self.findings.append(Finding(
                "<database>", 0, "warning",
                f"connected as {role}, which bypasses row-level security: check as hcrepo_app "
                "to see the privileges the application has",
            ))

    def check(self, cls: type[Repository], attribute: str, plan: Plan) -> None:
        query = plan.query
        where = f"{cls.__name__}.{attribute}"

        def report(severity: Severity, message: str, line: int | None = None) -> None:
            self.findings.append(
                Finding(query.path, line or query.line, severity, f"{where}: {message}")
            )

        texts = [query.sql]
        if query.order_by is not None:
            texts = [query.variants[column] for column in query.order_by.columns]
        described = None
        for text in texts:
            result, failure = self._describe(text)
            if failure is not None:
                message, position = failure
                report("error", message, query.line_at(text, position))
                return
            described = described or result
        assert described is not None
        columns, params = described
        self._compare_result(plan, columns, report)
        self._compare_params(cls, attribute, plan, params, report)
        self._check_relations(cls, query, report)
        self._check_independence(plan, report)
        if query.select_star:
            report("warning", "SELECT * (the result changes when the table does; name columns)")
        if isinstance(plan.shape, Many) and not isinstance(plan.shape, Stream) and (
            not query.is_write and not query.has_limit
        ):
            report("warning", "list query without LIMIT: add LIMIT :limit or return an Iterator")

    # -- describe --------------------------------------------------------------------------

    def _describe(
        self, text: str
    ) -> tuple[tuple[list[_Column], list[int]] | None, tuple[str, int | None] | None]:
        pgconn = self.conn.pgconn
        self._prepared += 1
        name = f"hcrepo_check_{self._prepared}".encode()
        prepared = pgconn.prepare(name, text.encode())
        if prepared.status != pq.ExecStatus.COMMAND_OK:
            error = pg_errors.error_from_result(prepared, encoding=pgconn._encoding)
            position = error.diag.statement_position
            # The primary message names objects, never values: there are none at PREPARE.
            return None, (
                f"does not prepare: {error.sqlstate} {error.diag.message_primary}",
                int(position) if position else None,
            )
        result = pgconn.describe_prepared(name)
        pgconn.exec_(b"DEALLOCATE " + name)
        columns = [
            _Column((result.fname(i) or b"").decode(), result.ftype(i), result.ftable(i),
                    result.ftablecol(i))
            for i in range(result.nfields)
        ]
        return (columns, [result.param_type(i) for i in range(result.nparams)]), None

    def _python_type(self, oid: int) -> Any:
        """What psycopg loads a type as (`list[X]` for arrays); None when unknown."""
        if oid in self._types:
            return self._types[oid]
        row = self.conn.execute(_TYPE_SQL, [oid]).fetchone()
        found: Any = None
        if row is not None:
            name, kind, category, element, base = row
            if kind == "d":
                found = self._python_type(base)
            elif kind == "e":
                found = str
            elif category == "A" and element:
                inner = self._python_type(element)
                found = None if inner is None else list[inner]  # type: ignore[valid-type]
            else:
                found = _PYTHON_TYPES.get(name)
        self._types[oid] = found
        return found

    def _type_name(self, oid: int) -> str:
        row = self.conn.execute("SELECT format_type(%s, NULL)", [oid]).fetchone()
        return str(row[0]) if row else str(oid)

    # -- result columns --------------------------------------------------------------------

    def _compare_result(self, plan: Plan, columns: list[_Column], report: _Report) -> None:
        row = plan.shape.row
        if row is None:
            return  # `-> int` rowcount or `-> None`: no rows to compare
        if not columns:
            report("error", "the statement returns no rows but the method returns them")
            return
        if not row.is_model:
            if len(columns) != 1:
                report("error", f"returns {len(columns)} columns; a scalar result needs one")
                return
            column = columns[0]
            self._compare_type(column, row.target, f"the {row.target.__name__} result", report)
            if not isinstance(plan.shape, OneOrNone):
                self._require_not_null(column, f"the {row.target.__name__} result", report)
            return
        model = typing.cast(type[BaseModel], row.target)
        fields = model.model_fields
        names = [c.name for c in columns]
        for duplicate in sorted({n for n in names if names.count(n) > 1}):
            report("error", f"column {duplicate} appears twice")
        for column in columns:
            label = f"{model.__name__}.{column.name}"
            if column.name not in fields:
                report("error", f"column {column.name} is not a field of {model.__name__}")
                continue
            annotation = fields[column.name].annotation
            self._compare_type(column, annotation, label, report)
            if not without_none(annotation)[1]:
                self._require_not_null(column, label, report)
        for name, field in fields.items():
            if field.is_required() and name not in names:
                report("error", f"{model.__name__}.{name} has no column in the result")

    def _compare_type(self, column: _Column, annotation: Any, label: str, report: _Report) -> None:
        actual = self._python_type(column.type_oid)
        if actual is None:
            report("warning", f"column {column.name}: cannot compare type "
                              f"{self._type_name(column.type_oid)} with {label}")
        elif not _compatible(annotation, actual):
            report("error", f"column {column.name} is {self._type_name(column.type_oid)} "
                            f"({type_name(actual)}) but {label} is "
                            f"{type_name(annotation)}")

    def _require_not_null(self, column: _Column, label: str, report: _Report) -> None:
        source = self._base_column(column.table_oid, column.table_column)
        if source is None:
            return  # an expression: PostgreSQL does not say whether it can be NULL
        row = self.conn.execute(_NOT_NULL_SQL, list(source)).fetchone()
        if row is not None and not row[2]:
            report("error", f"column {column.name} ({row[0]}.{row[1]}) may be NULL "
                            f"but {label} is not Optional")

    def _base_column(self, oid: int, attnum: int) -> tuple[int, int] | None:
        """The table column a result column comes from, looking through views over one
        relation whose column is a plain reference (patient_records); None for an
        expression, which PostgreSQL says nothing about."""
        for _ in range(8):  # a view of a view of ..., bounded
            if not oid:
                return None
            view = self._view(oid)
            if view is None:
                return oid, attnum
            definition, bases = view
            if len(bases) != 1:
                return None
            statement = parser.parse_sql(definition)[0].stmt
            targets = statement.targetList if isinstance(statement, ast.SelectStmt) else None
            if not targets or not 0 < attnum <= len(targets):
                return None
            value = targets[attnum - 1].val
            name = value.fields[-1] if isinstance(value, ast.ColumnRef) and value.fields else None
            if not isinstance(name, ast.String):
                return None
            found = self.conn.execute(_ATTNUM_SQL, [bases[0], name.sval]).fetchone()
            base = self.conn.execute("SELECT to_regclass(%s)::oid", [bases[0]]).fetchone()
            if found is None or base is None:
                return None
            oid, attnum = int(base[0]), int(found[0])
        return None

    def _view(self, oid: int) -> tuple[str, list[str]] | None:
        row = self.conn.execute(_VIEW_SQL, [oid]).fetchone()
        return (str(row[0]), list(row[1])) if row is not None else None

    def _read_relations(self, names: Iterable[str]) -> list[str]:
        """`names` with the relations every view among them reads, so that the checks of
        row-level security see the tables behind a view."""
        found: list[str] = []
        pending = sorted(names)
        while pending:
            name = pending.pop(0)
            if name in found:
                continue
            found.append(name)
            relation = self._relation(name)
            view = self._view(relation[0]) if relation is not None and relation[2] == "v" \
                else None
            pending.extend(view[1] if view else [])
        return found

    # -- parameters ------------------------------------------------------------------------

    def _compare_params(
        self, cls: type[Repository], attribute: str, plan: Plan, params: list[int], report: _Report
    ) -> None:
        declared = getattr(getattr(cls, attribute), "__wrapped__", None)
        if declared is None:
            return
        hints = typing.get_type_hints(declared)
        for name, oid in zip(plan.param_names, params, strict=True):
            actual = self._python_type(oid)
            annotation = hints.get(name)
            if actual is None or annotation is None or _compatible(annotation, actual):
                continue
            report("warning", f"parameter :{name} is {self._type_name(oid)} "
                              f"({type_name(actual)}) but the signature says "
                              f"{type_name(annotation)}")

    # -- tables: row-level security and privileges -----------------------------------------

    def _check_relations(
        self, cls: type[Repository], query: sqlfile.SqlQuery, report: _Report
    ) -> None:
        needed = _privileges(query)
        for table in self._read_relations(query.tables):
            relation = self._relation(table)
            if relation is None:
                continue  # a CTE name
            oid, relname, kind, enabled, forced, tenant = relation
            if tenant and kind in ("r", "p"):
                if not enabled:
                    report("error", f"tenant table {relname} does not enable row level security")
                elif not forced:
                    report("error", f"tenant table {relname} does not force row level security "
                                    "(its owner bypasses the policies)")
                if not cls.__tenant_scoped__:
                    report("warning", f"uses tenant table {relname} but the repository is "
                                      "tenant=False: calls without a clinic see no rows")
            for privilege in sorted(needed.get(table, set())):
                row = self.conn.execute(_PRIVILEGE_SQL, {"oid": oid, "privilege": privilege})
                allowed = row.fetchone()
                if allowed is not None and not allowed[0]:
                    report("error", f"the connected role has no {privilege} privilege on "
                                    f"{relname}")

    def _check_independence(self, plan: Plan, report: _Report) -> None:
        """A result shared across values of a policy input must not be shaped by it."""
        independent = plan.cache.independent_of if plan.cache is not None else ()
        if not independent:
            return
        for table in self._read_relations(plan.query.tables):
            relation = self._relation(table)
            if relation is None:
                continue
            for policy, *expressions in self.conn.execute(_POLICIES_SQL, [relation[0]]):
                for name in independent:
                    if any(_reads_input(text, name) for text in expressions if text):
                        report("error", f"@cached(independent_of={name!r}) but policy "
                                        f"{policy} on {relation[1]} reads app.{name}: its "
                                        f"cached results would be shared across {name}s")

    def _relation(self, name: str) -> tuple[Any, ...] | None:
        if name not in self._relations:
            self._relations[name] = self.conn.execute(_RELATION_SQL, [name]).fetchone()
        return self._relations[name]


# The staff role reaches policies through these functions (migrations/0007), which read
# app.role; the actor they also read is covered by the cache keying an unclaimed role by it.
_ROLE_FUNCTIONS = re.compile(r"\bhcrepo_(scope|staff)_role\s*\(", re.IGNORECASE)


def _reads_input(text: str, name: str) -> bool:
    """Whether a policy expression depends on the policy input `name`."""
    return reads_setting(text, name) or (name == "role" and bool(_ROLE_FUNCTIONS.search(text)))


def _privileges(query: sqlfile.SqlQuery) -> dict[str, set[str]]:
    """Table -> privileges the statement needs: SELECT on what it reads, and the write."""
    needed: dict[str, set[str]] = {table: {"SELECT"} for table in query.tables}
    _Writes(needed)(parser.parse_sql(query.sql))
    return needed


class _Writes(visitors.Visitor):
    """Adds INSERT/UPDATE/DELETE on each statement's target (data-modifying CTEs too)."""

    def __init__(self, needed: dict[str, set[str]]) -> None:
        super().__init__()
        self.needed = needed

    def _target(self, node: Any, privilege: str) -> None:
        target = _relation_name(node.relation)
        self.needed.setdefault(target, set()).add(privilege)
        returning = getattr(node, "returningClause", None) or getattr(node, "returningList", None)
        if privilege == "INSERT" and not returning:
            self.needed[target].discard("SELECT")  # a plain INSERT reads nothing back

    def visit_InsertStmt(self, ancestors: Any, node: ast.InsertStmt) -> None:
        self._target(node, "INSERT")

    def visit_UpdateStmt(self, ancestors: Any, node: ast.UpdateStmt) -> None:
        self._target(node, "UPDATE")

    def visit_DeleteStmt(self, ancestors: Any, node: ast.DeleteStmt) -> None:
        self._target(node, "DELETE")


def _relation_name(relation: ast.RangeVar) -> str:
    return ".".join(part for part in (relation.schemaname, relation.relname) if part)


def _compatible(annotation: Any, actual: Any) -> bool:
    """Whether a value psycopg loads as `actual` is a valid value of `annotation`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is object or actual is Any:
        return True
    if origin is typing.Annotated:
        return _compatible(args[0], actual)
    if origin in (types.UnionType, typing.Union):
        return any(_compatible(a, actual) for a in without_none(annotation)[0])
    if origin is Literal:
        return all(_compatible(type(value), actual) for value in args)
    if typing.get_origin(actual) is list:
        inner = typing.get_args(actual)[0]
        return origin in (list, Sequence, Iterable) and (not args or _compatible(args[0], inner))
    if not isinstance(annotation, type):
        return False
    if issubclass(annotation, BaseModel) or issubclass(annotation, dict):
        return actual is Any
    if actual is int and annotation is float:
        return True
    if issubclass(annotation, enum.Enum):
        return issubclass(annotation, actual)  # StrEnum <- text, IntEnum <- integer
    return isinstance(actual, type) and issubclass(actual, annotation) and not (
        actual is bool and annotation is int
    )
