"""Hand-written `.sql` files: named blocks, `:name` parameters, read/write from the parse tree.

A file holds blocks that start with `-- name: <query>`; the comment lines right after it may
carry directives (`-- timeout: 2s`, `-- order_by: sort = last_name, created_at`,
`-- max_page: 200`, `-- kind: write`, and for encrypted columns `-- encrypt: patients.ssn`,
`-- blind_index: patients.ssn using digits`, `-- generate: id`: hcrepo.sealing).
A block is one SELECT (VALUES, set operations), INSERT, UPDATE, DELETE or MERGE: anything
that outlives its transaction (SET, cursors, PREPARE, LISTEN, temporary objects, session
advisory locks, set_config(..., false)) would stay on the pooled connection for the next
clinic's request; transaction control, and the clinic, actor and role settings, are hcrepo's.
A statement is a write when anything in its tree writes or locks rows.

Parameters are found with PostgreSQL's own lexer (pglast.scan), so casts, strings, comments,
dollar quotes and `%` need no special cases, and are rewritten once to `$n` placeholders:
hcrepo sends statements through libpq directly.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from pglast import ast, enums, parser, visitors

from hcrepo import durations
from hcrepo.crypto.blind_index import NORMALISERS
from hcrepo.errors import SqlFileError

_NAME_LINE = re.compile(r"^\s*--\s*name\s*:\s*(?P<name>\S*)\s*$")
_DIRECTIVE_LINE = re.compile(r"^\s*--\s*(?P<key>[a-z_]+)\s*:\s*(?P<value>.*?)\s*$")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_DIRECTIVES = frozenset({"timeout", "order_by", "max_page", "kind", "encrypt", "blind_index",
                         "generate"})
_COLUMN = re.compile(r"^(?P<table>[a-z_][a-z0-9_]*)\.(?P<column>[a-z_][a-z0-9_]*)$")
_BLIND_INDEX = re.compile(
    r"^(?P<table>[a-z_][a-z0-9_]*)\.(?P<column>[a-z_][a-z0-9_]*)(\s+using\s+(?P<using>\w+))?$"
)
BLIND_INDEX_SUFFIX = "_bidx"

# What a block may hold: a statement whose effects end with its transaction.
_QUERIES = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
# Any of these anywhere in the tree (a sub-select, a CTE, a sub-link) makes a statement a write.
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt, ast.LockingClause)
_SESSION_STATE = "would leave session state on a pooled connection"
_TRANSACTION_CONTROL = "transaction control belongs to the unit of work"
_NOT_A_QUERY = "a query block holds one SELECT, INSERT, UPDATE, DELETE or MERGE"
# Statements whose effect outlives the transaction on the server session, which the pool
# hands to another clinic's request next.
_SESSION_STATEMENTS = (
    ast.VariableSetStmt, ast.DeclareCursorStmt, ast.FetchStmt, ast.ClosePortalStmt,
    ast.PrepareStmt, ast.ExecuteStmt, ast.DeallocateStmt, ast.ListenStmt, ast.UnlistenStmt,
    ast.DiscardStmt, ast.LoadStmt,
)
_KIND_NAMES: dict[type[ast.Node], str] = {
    ast.CreateStmt: "CREATE TABLE", ast.ViewStmt: "CREATE VIEW", ast.IndexStmt: "CREATE INDEX",
    ast.ClosePortalStmt: "CLOSE", ast.VariableShowStmt: "SHOW",
}
_TRANSACTION_NAMES = {
    enums.TransactionStmtKind.TRANS_STMT_START: "START TRANSACTION",
    enums.TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
}
# Functions that take or drop session-level advisory locks: held past COMMIT, by the pool.
_SESSION_LOCK_FUNCTIONS = frozenset({
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
})
# Settings that carry hcrepo's context for the transaction (and the roles RLS applies to).
_CONTEXT_PREFIX = "app."
_ROLE_SETTINGS = frozenset({"role", "session_authorization"})


class OrderBy(NamedTuple):
    """A whitelisted dynamic ORDER BY: `:param` in the SQL takes one of `columns`."""

    param: str
    columns: tuple[str, ...]


class Column(NamedTuple):
    """An encrypted column (`-- encrypt: table.column`)."""

    table: str
    column: str


class BlindIndexed(NamedTuple):
    """`-- blind_index: table.column using <normaliser>`: the SQL parameter
    `:<column>_bidx` is the blind index of the method's argument `<column>`."""

    table: str
    column: str
    normaliser: str

    @property
    def param(self) -> str:
        return self.column + BLIND_INDEX_SUFFIX


class SqlQuery(NamedTuple):
    """One named block of a `.sql` file, checked and rewritten."""

    name: str
    path: str
    line: int
    sql: str
    params: tuple[str, ...]
    is_write: bool
    returns_rows: bool
    tables: frozenset[str]
    select_star: bool
    has_limit: bool
    timeout_ms: int | None
    max_page: int | None
    order_by: OrderBy | None
    variants: dict[str, str]
    sql_line: int
    """The file line where the statement's text starts (after directives and blank lines)."""
    encrypted: tuple[Column, ...] = ()
    blind_indexed: tuple[BlindIndexed, ...] = ()
    generated: tuple[str, ...] = ()
    """Parameters whose value hcrepo generates (a new row's UUID, known before sending)."""

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def line_at(self, sent: str, position: int | None) -> int:
        """The file line of a 1-based character position in `sent` (the statement or one of
        its ORDER BY variants, as sent), such as a server error's; the `-- name:` line when
        there is none."""
        if not position:
            return self.line
        return self.sql_line + sent[: position - 1].count("\n")

    def sql_for(self, order: str | None) -> str:
        """The statement text for one whitelisted ordering (`col` or `-col`)."""
        return self.sql if order is None else self.variants[order]


class _Block(NamedTuple):
    name: str
    line: int
    directives: dict[str, tuple[str, int]]
    body: str
    body_line: int


@cache
def load(path: Path) -> dict[str, SqlQuery]:
    """Parse a file once per process; the result is shared by every repository using it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SqlFileError(
            f"cannot read SQL file ({exc.strerror})", path=str(path), line=1
        ) from None
    return parse(text, str(path))


def parse(text: str, path: str) -> dict[str, SqlQuery]:
    queries: dict[str, SqlQuery] = {}
    for block in _split_blocks(text, path):
        if block.name in queries:
            first = queries[block.name]
            raise SqlFileError(
                f"duplicate query name (first defined at line {first.line})",
                path=path, line=block.line, column=1, query=block.name,
            )
        queries[block.name] = _compile(block, path)
    return queries


def _split_blocks(text: str, path: str) -> list[_Block]:
    blocks: list[_Block] = []
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _NAME_LINE.match(line)]
    preamble = [line for line in lines[: starts[0] if starts else len(lines)] if line.strip()]
    if any(not line.lstrip().startswith("--") for line in preamble):
        raise SqlFileError("SQL before the first '-- name:' line", path=path, line=1, column=1)
    for index, start in enumerate(starts):
        match = _NAME_LINE.match(lines[start])
        assert match is not None
        name = match["name"]
        if not _IDENTIFIER.match(name):
            raise SqlFileError(
                "query name must be a lower-case identifier", path=path, line=start + 1,
                column=1, query=name or None,
            )
        end = starts[index + 1] if index + 1 < len(starts) else len(lines)
        directives: dict[str, tuple[str, int]] = {}
        cursor = start + 1
        while cursor < end:
            directive = _DIRECTIVE_LINE.match(lines[cursor])
            if not directive:
                break
            key = directive["key"]
            if key not in _DIRECTIVES:
                raise SqlFileError(
                    f"unknown directive {key!r} (known: {', '.join(sorted(_DIRECTIVES))})",
                    path=path, line=cursor + 1, column=1, query=name,
                )
            directives[key] = (directive["value"], cursor + 1)
            cursor += 1
        blocks.append(_Block(name, start + 1, directives, "\n".join(lines[cursor:end]), cursor + 1))
    return blocks


def _compile(block: _Block, path: str) -> SqlQuery:
    def fail(message: str, line: int, column: int | None = None) -> SqlFileError:
        return SqlFileError(message, path=path, line=line, column=column, query=block.name)

    order_by = _order_by_directive(block, fail)
    params, rewritten, order_slot, layout = _rewrite_params(block, order_by, fail)
    body = rewritten.strip().rstrip(";").strip()
    if not _has_code(body):
        raise fail("empty query block", block.line, 1)
    try:
        statements = parser.parse_sql(layout)
    except parser.ParseError as exc:
        message, offset = exc.args[0], exc.args[1] if len(exc.args) > 1 else 0
        line, column = _position(block.body, int(offset))
        raise fail(f"syntax error: {message}", block.body_line + line, column) from None
    if len(statements) != 1:
        raise fail(f"one statement per block, found {len(statements)}", block.body_line, 1)
    statement = statements[0].stmt
    assert statement is not None
    _refuse_session_effects(statement, statements[0].stmt_location or 0, block, fail)
    is_write = _is_write(statement)
    forced_kind = block.directives.get("kind")
    if forced_kind is not None:
        kind, line = forced_kind
        if kind not in ("read", "write"):
            raise fail("kind must be 'read' or 'write'", line, 1)
        if kind == "read" and is_write:
            raise fail("kind: read on a statement that writes", line, 1)
        is_write = kind == "write"
    header = f"/* hcrepo:{block.name} */ "
    sql = header + body
    variants: dict[str, str] = {}
    if order_by is not None and order_slot is not None:
        sql = header + body.replace(order_slot, _quote(order_by.columns[0]))
        for choice in order_by.columns:
            variants[choice] = header + body.replace(order_slot, f"{_quote(choice)} ASC")
            variants[f"-{choice}"] = header + body.replace(order_slot, f"{_quote(choice)} DESC")
    return SqlQuery(
        name=block.name,
        path=path,
        line=block.line,
        sql=sql,
        params=params,
        is_write=is_write,
        returns_rows=_returns_rows(statement),
        tables=frozenset(visitors.referenced_relations(statements[0])),
        select_star=_select_star(statement),
        has_limit=isinstance(statement, ast.SelectStmt) and statement.limitCount is not None,
        timeout_ms=_timeout_directive(block, fail),
        max_page=_max_page_directive(block, fail),
        order_by=order_by,
        variants=variants,
        sql_line=block.body_line + _leading_lines(block.body),
        **_field_directives(block, params, fail),
    )


def _field_directives(block: _Block, params: tuple[str, ...], fail: Any) -> dict[str, Any]:
    """`encrypt`, `blind_index` and `generate`, checked against each other and the SQL."""
    encrypted: list[Column] = []
    if "encrypt" in block.directives:
        value, line = block.directives["encrypt"]
        for item in (part.strip() for part in value.split(",")):
            found = _COLUMN.match(item)
            if found is None:
                raise fail("encrypt must list table.column names", line, 1)
            encrypted.append(Column(found["table"], found["column"]))
    indexed: list[BlindIndexed] = []
    if "blind_index" in block.directives:
        value, line = block.directives["blind_index"]
        for item in (part.strip() for part in value.split(",")):
            found = _BLIND_INDEX.match(item)
            if found is None:
                raise fail("blind_index must read 'table.column [using normaliser]'", line, 1)
            using = found["using"] or "text"
            if using not in NORMALISERS:
                raise fail(f"unknown normaliser {using!r} (known: "
                           f"{', '.join(sorted(NORMALISERS))})", line, 1)
            entry = BlindIndexed(found["table"], found["column"], using)
            if Column(entry.table, entry.column) not in encrypted:
                raise fail(f"blind_index of {item.split()[0]}, which encrypt does not list",
                           line, 1)
            if entry.param not in params:
                raise fail(f"blind_index needs the parameter :{entry.param} in the SQL", line, 1)
            indexed.append(entry)
    generated: tuple[str, ...] = ()
    if "generate" in block.directives:
        value, line = block.directives["generate"]
        generated = tuple(part.strip() for part in value.split(",") if part.strip())
        for name in generated:
            if name not in params:
                raise fail(f"generate names :{name}, which the SQL does not use", line, 1)
    return {"encrypted": tuple(encrypted), "blind_indexed": tuple(indexed),
            "generated": generated}


def _leading_lines(body: str) -> int:
    return body[: len(body) - len(body.lstrip())].count("\n")


def _rewrite_params(
    block: _Block, order_by: OrderBy | None, fail: Any
) -> tuple[tuple[str, ...], str, str | None, str]:
    """Replace `:name` with `$n` using PostgreSQL's lexer; return names in `$n` order.

    Also returns the layout: the body with each parameter replaced by text of the same length
    (`$1`, or a column for the ORDER BY slot), which parses like the statement and keeps
    every error position where it is in the file. pglast counts characters, not bytes.
    """
    text = block.body
    try:
        tokens = parser.scan(text)
    except parser.ParseError as exc:
        line, column = _position(text, int(exc.args[1]) if len(exc.args) > 1 else 0)
        raise fail(f"cannot tokenize: {exc.args[0]}", block.body_line + line, column) from None
    order_slot = "__hcrepo_order_by__"
    names: list[str] = []
    pieces: list[str] = []
    layout: list[str] = []
    copied = 0
    for colon, word in itertools.pairwise(tokens):
        if text[colon.start : colon.end + 1] != ":" or word.start != colon.end + 1:
            continue
        name = text[word.start : word.end + 1]
        if not _IDENTIFIER.match(name):
            continue
        pieces.append(text[copied : colon.start])
        layout.append(text[copied : colon.start])
        width = word.end + 1 - colon.start
        if order_by is not None and name == order_by.param:
            pieces.append(order_slot)
            layout.append("x".ljust(width))
        else:
            if name not in names:
                names.append(name)
            pieces.append(f"${names.index(name) + 1}")
            layout.append("$1".ljust(width))
        copied = word.end + 1
    pieces.append(text[copied:])
    layout.append(text[copied:])
    rewritten = "".join(pieces)
    if order_by is not None and order_slot not in rewritten:
        line = block.directives["order_by"][1]
        raise fail(f"order_by parameter :{order_by.param} does not appear in the SQL", line, 1)
    return tuple(names), rewritten, order_slot if order_by is not None else None, "".join(layout)


def _order_by_directive(block: _Block, fail: Any) -> OrderBy | None:
    if "order_by" not in block.directives:
        return None
    value, line = block.directives["order_by"]
    param, equals, columns = value.partition("=")
    names = tuple(column.strip() for column in columns.split(",") if column.strip())
    if not equals or not _IDENTIFIER.match(param.strip()) or not names:
        raise fail("order_by must read '<param> = <column>, <column>, ...'", line, 1)
    for column in names:
        if not _IDENTIFIER.match(column):
            raise fail(f"order_by column {column!r} is not a plain identifier", line, 1)
    return OrderBy(param.strip(), names)


def _timeout_directive(block: _Block, fail: Any) -> int | None:
    if "timeout" not in block.directives:
        return None
    value, line = block.directives["timeout"]
    try:
        milliseconds = int(durations.parse(value) * 1000)
    except ValueError:
        raise fail(f"timeout must look like {durations.EXAMPLES}", line, 1) from None
    if milliseconds <= 0:
        raise fail("timeout must be positive", line, 1)
    return milliseconds


def _max_page_directive(block: _Block, fail: Any) -> int | None:
    if "max_page" not in block.directives:
        return None
    value, line = block.directives["max_page"]
    if not value.isdigit() or int(value) < 1:
        raise fail("max_page must be a positive integer", line, 1)
    return int(value)


def _refuse_session_effects(statement: ast.Node, start: int, block: _Block, fail: Any) -> None:
    """Only statements whose effects end with the transaction: a pooled connection goes to
    another clinic's request next, and hcrepo (not the SQL) owns the transaction."""
    refusal = _refusal(statement)
    if refusal is not None:
        kind, why = refusal
        line, column = _position(block.body, start)
        raise fail(f"{kind} is not allowed: {why}", block.body_line + line, column)
    for node in _nodes(statement):
        if not isinstance(node, ast.FuncCall):
            continue
        refused = _function_refusal(node)
        if refused is not None:
            line, column = _position(block.body, node.location or 0)
            raise fail(f"{_function_name(node)}() {refused}", block.body_line + line, column)


def _refusal(statement: ast.Node) -> tuple[str, str] | None:
    """(statement kind, why) for a statement a query block may not hold, else None."""
    if isinstance(statement, ast.SelectStmt) and statement.intoClause is not None:
        return "SELECT INTO", _created_why(statement)
    if isinstance(statement, _QUERIES):
        return None
    if isinstance(statement, ast.TransactionStmt):
        kind = statement.kind
        assert kind is not None  # the parser always sets it
        name = _TRANSACTION_NAMES.get(kind) or kind.name.removeprefix("TRANS_STMT_")
        return name.replace("_", " "), _TRANSACTION_CONTROL
    if isinstance(statement, ast.VariableSetStmt):
        if statement.kind in (enums.VariableSetKind.VAR_RESET,
                              enums.VariableSetKind.VAR_RESET_ALL):
            return "RESET", _SESSION_STATE
        if statement.is_local or statement.name == "TRANSACTION":
            return "SET LOCAL" if statement.is_local else "SET TRANSACTION", _TRANSACTION_CONTROL
        return "SET", _SESSION_STATE
    name = _KIND_NAMES.get(type(statement)) or re.sub(
        r"(?<=[a-z])(?=[A-Z])", " ", type(statement).__name__.removesuffix("Stmt")
    ).upper()
    if isinstance(statement, _SESSION_STATEMENTS):
        return name, _SESSION_STATE
    return name, _created_why(statement)


def _created_why(statement: ast.Node) -> str:
    """A temporary object lives as long as the session; anything else is not a query."""
    temporary = any(
        isinstance(node, ast.RangeVar) and node.relpersistence == "t"
        for node in _nodes(statement)
    )
    return f"a temporary object {_SESSION_STATE}" if temporary else _NOT_A_QUERY


def _function_name(call: ast.FuncCall) -> str:
    return str(call.funcname[-1].sval) if call.funcname else ""


def _function_refusal(call: ast.FuncCall) -> str | None:
    """Why a block may not call this function (session locks, hcrepo's settings), or None."""
    name = _function_name(call)
    if name in _SESSION_LOCK_FUNCTIONS:
        return f"{_SESSION_STATE} (use pg_advisory_xact_lock)"
    if name != "set_config":
        return None
    args = call.args or ()
    setting = _literal(args[0]) if args else None
    if not isinstance(setting, str) or _is_context_setting(setting.lower()):
        return ("may change the clinic, actor or role hcrepo set for the transaction "
                "(name the setting literally, outside app.*)")
    if len(args) != 3 or _literal(args[2]) is not True:
        return f"{_SESSION_STATE} (pass is_local = true)"
    return None


def _is_context_setting(setting: str) -> bool:
    return setting.startswith(_CONTEXT_PREFIX) or setting in _ROLE_SETTINGS


def _literal(node: Any) -> str | bool | None:
    """The value of a string or boolean constant; None for anything else."""
    value = node.val if isinstance(node, ast.A_Const) else None
    if isinstance(value, ast.String):
        return str(value.sval)
    if isinstance(value, ast.Boolean):
        return bool(value.boolval)
    return None


def _nodes(root: ast.Node) -> Iterator[ast.Node]:
    """Every node of a parse tree: sub-selects, CTEs, sub-links and expressions included."""
    pending: list[Any] = [root]
    while pending:
        item = pending.pop()
        if isinstance(item, ast.Node):
            yield item
            pending.extend(getattr(item, member) for member in item)
        elif isinstance(item, tuple):
            pending.extend(item)


def _is_write(statement: ast.Node) -> bool:
    """Read means a SELECT with no locking clause and no data-modifying statement anywhere
    in its tree (SELECT INTO is refused before this is asked)."""
    return any(isinstance(node, _WRITES) for node in _nodes(statement))


def _returns_rows(statement: ast.Node) -> bool:
    if isinstance(statement, ast.SelectStmt):
        return True
    returning = getattr(statement, "returningClause", None) or getattr(
        statement, "returningList", None
    )
    return bool(returning)


def _select_star(statement: ast.Node) -> bool:
    if not isinstance(statement, ast.SelectStmt):
        return False
    for target in statement.targetList or ():
        value = target.val
        if (
            isinstance(value, ast.ColumnRef)
            and value.fields
            and isinstance(value.fields[-1], ast.A_Star)
        ):
            return True
    return any(_select_star(branch) for branch in (statement.larg, statement.rarg) if branch)


def _has_code(body: str) -> bool:
    try:
        return any(
            token.name not in ("SQL_COMMENT", "C_COMMENT") for token in parser.scan(body)
        )
    except parser.ParseError:
        return True  # let the parser report where


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _position(text: str, offset: int) -> tuple[int, int]:
    """Zero-based line and one-based column of a character offset into `text`."""
    before = text[:offset]
    line = before.count("\n")
    return line, offset - (before.rfind("\n") + 1) + 1
