"""Hand-written `.sql` files: named blocks, `:name` parameters, read/write from the parse tree.

A file holds blocks that start with `-- name: <query>`; the comment lines right after it may
carry directives (`-- timeout: 2s`, `-- order_by: sort = last_name, created_at`,
`-- max_page: 200`, `-- kind: write`). Parameters are found with PostgreSQL's own lexer
(pglast.scan), so casts, strings, comments, dollar quotes and `%` need no special cases, and are
rewritten once to `$n` placeholders: hcrepo sends statements through libpq directly.
"""

from __future__ import annotations

import itertools
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from pglast import ast, parser, visitors

from hcrepo.errors import SqlFileError

_NAME_LINE = re.compile(r"^\s*--\s*name\s*:\s*(?P<name>\S*)\s*$")
_DIRECTIVE_LINE = re.compile(r"^\s*--\s*(?P<key>[a-z_]+)\s*:\s*(?P<value>.*?)\s*$")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_DURATION = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|min)$")
_DIRECTIVES = frozenset({"timeout", "order_by", "max_page", "kind"})
_UNIT_MS = {"ms": 1.0, "s": 1000.0, "min": 60000.0}


class OrderBy(NamedTuple):
    """A whitelisted dynamic ORDER BY: `:param` in the SQL takes one of `columns`."""

    param: str
    columns: tuple[str, ...]


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

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

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
    )


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
    match = _DURATION.match(value)
    if not match:
        raise fail("timeout must look like 500ms, 2s or 1min", line, 1)
    milliseconds = int(float(match["amount"]) * _UNIT_MS[match["unit"]])
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


def _is_write(statement: ast.Node) -> bool:
    """Read means a plain SELECT: no locking clause, no INTO, no data-modifying CTE."""
    if not isinstance(statement, ast.SelectStmt):
        return True
    if statement.lockingClause or statement.intoClause is not None:
        return True
    return any(
        not isinstance(cte.ctequery, ast.SelectStmt) or _is_write(cte.ctequery)
        for cte in _ctes(statement)
    )


def _ctes(statement: ast.SelectStmt) -> list[ast.CommonTableExpr]:
    found: list[ast.CommonTableExpr] = []
    if statement.withClause is not None:
        found.extend(statement.withClause.ctes or ())
    for branch in (statement.larg, statement.rarg):
        if branch is not None:
            found.extend(_ctes(branch))
    return found


def _returns_rows(statement: ast.Node) -> bool:
    if isinstance(statement, ast.SelectStmt):
        return statement.intoClause is None
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
