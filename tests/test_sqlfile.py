"""The SQL file compiler: parameters, directives, read/write from the parse tree, errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from hcrepo import Database, Repository, Settings, SqlFileError, query
from hcrepo.sqlfile import SqlQuery, load, parse
from tests.plugins.database import Database as ServerDatabase

EDGE = Path(__file__).parent / "sql" / "parsing.sql"


class EdgeRow(BaseModel):
    cast_value: int
    quoted: str
    escaped: str
    dollar: str
    tagged: str
    accented: str
    like_match: bool
    modulo: int
    slice: list[int]
    named_argument: timedelta
    quoted_identifier: str


class Parsing(Repository, sql="sql/parsing.sql", tenant=False):
    @query("edge_cases")
    def edge_cases(self, *, x: int, word: str) -> EdgeRow: ...


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    with Database(Settings(database_url=migrated_db.app_url, pool_min=1, pool_max=2)) as database:
        yield database


def one(text: str) -> SqlQuery:
    (found,) = parse(text, "f.sql").values()
    return found


def error(text: str) -> SqlFileError:
    with pytest.raises(SqlFileError) as caught:
        parse(text, "f.sql")
    return caught.value


# --- parameters -----------------------------------------------------------------------------


def test_only_real_parameters_are_rewritten() -> None:
    edge = load(EDGE.resolve())["edge_cases"]
    assert edge.params == ("x", "word")
    sql = edge.sql
    assert sql.startswith("/* hcrepo:edge_cases */ -- Comment with :not_a_param")
    for kept in ("$1::int AS cast_value", "':y' AS quoted", r"E'it\'s :z'", "$$ :w $$",
                 "$tag$ :q $$ $tag$", "'é' || $2", "/* :cc /* nested :n */ */",
                 "'%' || $2 || '%'", "7 % 3", "[2:3]", "make_interval(days := $1)",
                 '":quoted" AS quoted_identifier -- :trailing', "WHERE $1 = $1"):
        assert kept in sql, kept
    assert ":x" not in sql and ":word" not in sql


def test_the_rewrite_runs_as_written(db: Database) -> None:
    row = Parsing(db).edge_cases(x=2, word="b")
    assert row == EdgeRow(
        cast_value=2, quoted=":y", escaped="it's :z", dollar=" :w ", tagged=" :q $$ ",
        accented="éb", like_match=True, modulo=1, slice=[2, 3],
        named_argument=timedelta(days=2), quoted_identifier="abc",
    )


def test_a_repeated_parameter_is_sent_once() -> None:
    q = one("-- name: q\nSELECT :a, :b, :a, :a::text")
    assert q.params == ("a", "b")
    assert q.sql == "/* hcrepo:q */ SELECT $1, $2, $1, $1::text"


def test_lists_and_optional_filters_are_plain_parameters() -> None:
    q = one("-- name: q\nSELECT id FROM t WHERE id = ANY(:ids) AND (:x::int IS NULL OR x = :x)")
    assert q.params == ("ids", "x")
    assert "id = ANY($1) AND ($2::int IS NULL OR x = $2)" in q.sql


# --- directives -----------------------------------------------------------------------------


def test_directives() -> None:
    q = one(
        "-- name: q\n-- timeout: 1.5s\n-- max_page: 20\n-- order_by: sort = a, b\n"
        "SELECT a, b FROM t ORDER BY :sort, id LIMIT :limit"
    )
    assert (q.timeout_ms, q.max_page, q.params, q.has_limit) == (1500, 20, ("limit",), True)
    assert q.order_by is not None and q.order_by.columns == ("a", "b")
    assert q.variants["-b"] == '/* hcrepo:q */ SELECT a, b FROM t ORDER BY "b" DESC, id LIMIT $1'
    assert set(q.variants) == {"a", "-a", "b", "-b"}
    assert one("-- name: q\n-- timeout: 250ms\nSELECT 1").timeout_ms == 250
    assert one("-- name: q\n-- timeout: 2min\nSELECT 1").timeout_ms == 120_000


def test_comments_and_blank_lines_around_blocks() -> None:
    queries = parse(
        "-- File header: comments before the first block are fine.\n\n"
        "-- name: a\nSELECT 1;\n\n\n-- name: b\n-- A description, not a directive.\nSELECT 2\n",
        "f.sql",
    )
    assert [(q.name, q.line) for q in queries.values()] == [("a", 3), ("b", 7)]
    assert queries["a"].sql == "/* hcrepo:a */ SELECT 1"


# --- read or write, from the parse tree -----------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "is_write", "returns_rows"),
    [
        ("SELECT id FROM t", False, True),
        ("SELECT id FROM t UNION ALL SELECT id FROM u", False, True),
        ("VALUES (1), (2)", False, True),
        ("WITH x AS (SELECT id FROM t) SELECT id FROM x", False, True),
        ("SELECT id FROM t FOR UPDATE", True, True),
        ("SELECT id FROM t FOR SHARE SKIP LOCKED", True, True),
        ("WITH gone AS (DELETE FROM t RETURNING id) SELECT id FROM gone", True, True),
        ("WITH n AS (INSERT INTO t DEFAULT VALUES RETURNING id) SELECT id FROM n", True, True),
        ("WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT 1 UNION SELECT id FROM u",
         True, True),
        ("INSERT INTO t (a) VALUES (1) RETURNING id", True, True),
        ("INSERT INTO t (a) VALUES (1)", True, False),
        ("UPDATE t SET a = 1", True, False),
        ("DELETE FROM t WHERE id = 1 RETURNING id", True, True),
        ("SELECT pg_sleep(0) -- select", False, True),
        ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", True, False),
        ("SELECT s.id FROM (SELECT id FROM t FOR UPDATE) AS s", True, True),
        ("SELECT id FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", True, True),
        ("SELECT id FROM t WHERE EXISTS (SELECT FROM u WHERE u.id = t.id FOR SHARE)", True, True),
        ("SELECT (SELECT id FROM u FOR NO KEY UPDATE LIMIT 1) AS id", True, True),
        ("SELECT id FROM t JOIN LATERAL (SELECT 1 FROM u FOR KEY SHARE) AS l ON true",
         True, True),
        ("WITH x AS (SELECT id FROM t FOR UPDATE) SELECT id FROM x", True, True),
        ("WITH a AS (WITH b AS (DELETE FROM t RETURNING id) SELECT id FROM b) SELECT id FROM a",
         True, True),
        ("SELECT id FROM t UNION SELECT id FROM (SELECT id FROM u FOR UPDATE) AS s", True, True),
        ("INSERT INTO t (id) SELECT id FROM u", True, False),
        ("SELECT id FROM t WHERE id IN (SELECT id FROM u WHERE id IN (SELECT id FROM v))",
         False, True),
    ],
)
def test_read_or_write(sql: str, is_write: bool, returns_rows: bool) -> None:
    q = one(f"-- name: q\n{sql}")
    assert (q.is_write, q.returns_rows) == (is_write, returns_rows)


def test_a_write_nested_anywhere_cannot_be_declared_a_read() -> None:
    found = error("-- name: a\n-- kind: read\nSELECT s.id FROM (SELECT id FROM t FOR UPDATE) s")
    assert str(found).endswith(": kind: read on a statement that writes")


def test_kind_write_forces_a_select_to_the_primary() -> None:
    assert one("-- name: q\n-- kind: write\nSELECT nextval('s')").is_write


def test_tables_star_and_limit_are_recorded() -> None:
    q = one("-- name: q\nSELECT * FROM a JOIN public.b ON true WHERE x IN (SELECT y FROM c)")
    assert q.tables == {"a", "public.b", "c"}
    assert q.select_star and not q.has_limit
    assert not one("-- name: q\nSELECT a.x FROM a LIMIT 5").select_star
    assert one("-- name: q\nSELECT t.* FROM t").select_star


# --- every SqlFileError names file, line, column and query ----------------------------------


def test_syntax_error_points_at_file_line_and_column() -> None:
    text = ("-- name: ok\nSELECT 1\n\n-- name: broken\n-- timeout: 1s\n"
            "SELECT :long_parameter_name, 'é', id,\n  FROM t\n")
    found = error(text)
    assert (found.path, found.line, found.column, found.query) == ("f.sql", 7, 3, "broken")
    assert str(found) == 'f.sql:7:3 [broken]: syntax error: syntax error at or near "FROM"'


def test_unterminated_string_is_a_tokenizer_error() -> None:
    found = error("-- name: q\nSELECT 'é', 'abc\n")
    assert (found.line, found.column) == (2, 13)
    assert "unterminated quoted string" in str(found)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("-- name: e\n-- only a comment\n\n-- name: f\nSELECT 1", 1, "empty query block"),
        ("-- name: e\n", 1, "empty query block"),
        ("-- name: two\nSELECT 1; SELECT 2", 2, "one statement per block, found 2"),
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", 3,
         "duplicate query name (first defined at line 1)"),
        ("-- name: a\n-- retries: 3\nSELECT 1", 2,
         "unknown directive 'retries' (known: blind_index, encrypt, generate, kind, max_page, "
         "order_by, timeout)"),
        ("-- name: a\n-- encrypt: ssn\nSELECT 1", 2, "encrypt must list table.column names"),
        ("-- name: a\n-- blind_index: patients.ssn\nSELECT :ssn_bidx", 2,
         "blind_index of patients.ssn, which encrypt does not list"),
        ("-- name: a\n-- encrypt: patients.ssn\n-- blind_index: patients.ssn\nSELECT :ssn", 3,
         "blind_index needs the parameter :ssn_bidx in the SQL"),
        ("-- name: a\n-- encrypt: patients.ssn\n-- blind_index: patients.ssn using soundex\n"
         "SELECT :ssn_bidx", 3, "unknown normaliser 'soundex' (known: digits, text)"),
        ("-- name: a\n-- generate: id\nSELECT 1", 2,
         "generate names :id, which the SQL does not use"),
        ("-- name: a\n-- order_by: sort last_name\nSELECT 1", 2,
         "order_by must read '<param> = <column>, <column>, ...'"),
        ("-- name: a\n-- order_by: sort = last name\nSELECT 1", 2,
         "order_by column 'last name' is not a plain identifier"),
        ('-- name: a\n-- order_by: sort = "x"\nSELECT 1', 2,
         "order_by column '\"x\"' is not a plain identifier"),
        ("-- name: a\n-- order_by: sort = a\nSELECT 1 ORDER BY id", 2,
         "order_by parameter :sort does not appear in the SQL"),
        ("-- name: a\n-- timeout: 2 hours\nSELECT 1", 2,
         "timeout must look like 500ms, 2s, 1.5min or 1h"),
        ("-- name: a\n-- timeout: 0ms\nSELECT 1", 2, "timeout must be positive"),
        ("-- name: a\n-- max_page: lots\nSELECT 1", 2, "max_page must be a positive integer"),
        ("-- name: a\n-- kind: maybe\nSELECT 1", 2, "kind must be 'read' or 'write'"),
        ("-- name: a\n-- kind: read\nDELETE FROM t", 2, "kind: read on a statement that writes"),
        ("-- name: Bad-Name\nSELECT 1", 1, "query name must be a lower-case identifier"),
    ],
)
def test_file_errors(text: str, line: int, message: str) -> None:
    found = error(text)
    assert found.line == line
    assert str(found).endswith(": " + message)
    assert str(found).startswith(f"f.sql:{line}")


# --- only statements whose effects end with their transaction ------------------------------

SESSION = "would leave session state on a pooled connection"
TRANSACTION = "transaction control belongs to the unit of work"
NOT_A_QUERY = "a query block holds one SELECT, INSERT, UPDATE, DELETE or MERGE"


@pytest.mark.parametrize(
    ("sql", "kind", "why"),
    [
        ("DECLARE c CURSOR WITH HOLD FOR SELECT id FROM t", "DECLARE CURSOR", SESSION),
        ("DECLARE c NO SCROLL CURSOR FOR SELECT id FROM t", "DECLARE CURSOR", SESSION),
        ("FETCH 10 FROM c", "FETCH", SESSION),
        ("CLOSE c", "CLOSE", SESSION),
        ("SET search_path = evil", "SET", SESSION),
        ("SET SESSION statement_timeout = 0", "SET", SESSION),
        ("SET ROLE hcrepo_owner", "SET", SESSION),
        ("RESET app.clinic_id", "RESET", SESSION),
        ("RESET ALL", "RESET", SESSION),
        ("PREPARE p AS SELECT 1", "PREPARE", SESSION),
        ("EXECUTE p", "EXECUTE", SESSION),
        ("DEALLOCATE ALL", "DEALLOCATE", SESSION),
        ("LISTEN channel", "LISTEN", SESSION),
        ("UNLISTEN *", "UNLISTEN", SESSION),
        ("DISCARD ALL", "DISCARD", SESSION),
        ("LOAD 'auto_explain'", "LOAD", SESSION),
        ("CREATE TEMP TABLE carried AS SELECT id FROM patients", "CREATE TABLE AS",
         f"a temporary object {SESSION}"),
        ("CREATE TEMPORARY TABLE carried (id uuid)", "CREATE TABLE",
         f"a temporary object {SESSION}"),
        ("CREATE TEMP VIEW carried AS SELECT 1", "CREATE VIEW", f"a temporary object {SESSION}"),
        ("SELECT id INTO TEMP carried FROM patients", "SELECT INTO",
         f"a temporary object {SESSION}"),
        ("SELECT id INTO kept FROM patients", "SELECT INTO", NOT_A_QUERY),
        ("BEGIN", "BEGIN", TRANSACTION),
        ("START TRANSACTION", "START TRANSACTION", TRANSACTION),
        ("COMMIT", "COMMIT", TRANSACTION),
        ("END", "COMMIT", TRANSACTION),
        ("ROLLBACK", "ROLLBACK", TRANSACTION),
        ("SAVEPOINT s", "SAVEPOINT", TRANSACTION),
        ("RELEASE SAVEPOINT s", "RELEASE", TRANSACTION),
        ("ROLLBACK TO SAVEPOINT s", "ROLLBACK TO", TRANSACTION),
        ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION", TRANSACTION),
        ("COMMIT PREPARED 'x'", "COMMIT PREPARED", TRANSACTION),
        ("SET LOCAL app.clinic_id = 'x'", "SET LOCAL", TRANSACTION),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET TRANSACTION", TRANSACTION),
        ("CREATE TABLE kept (id uuid)", "CREATE TABLE", NOT_A_QUERY),
        ("CREATE INDEX ON patients (mrn)", "CREATE INDEX", NOT_A_QUERY),
        ("ALTER TABLE patients DISABLE ROW LEVEL SECURITY", "ALTER TABLE", NOT_A_QUERY),
        ("DROP TABLE patients", "DROP", NOT_A_QUERY),
        ("TRUNCATE patients", "TRUNCATE", NOT_A_QUERY),
        ("GRANT SELECT ON patients TO PUBLIC", "GRANT", NOT_A_QUERY),
        ("COPY patients TO STDOUT", "COPY", NOT_A_QUERY),
        ("DO $$ BEGIN END $$", "DO", NOT_A_QUERY),
        ("CALL p()", "CALL", NOT_A_QUERY),
        ("LOCK TABLE patients", "LOCK", NOT_A_QUERY),
        ("NOTIFY channel", "NOTIFY", NOT_A_QUERY),
        ("EXPLAIN ANALYZE DELETE FROM patients", "EXPLAIN", NOT_A_QUERY),
        ("SHOW search_path", "SHOW", NOT_A_QUERY),
        ("VACUUM patients", "VACUUM", NOT_A_QUERY),
    ],
)
def test_statements_that_outlive_their_transaction_are_refused(
    sql: str, kind: str, why: str
) -> None:
    found = error(f"-- name: a\n-- timeout: 1s\n\n  -- leading comment\n  {sql}")
    assert str(found) == f"f.sql:5:3 [a]: {kind} is not allowed: {why}"


CONTEXT = ("may change the clinic, actor or role hcrepo set for the transaction "
           "(name the setting literally, outside app.*)")


@pytest.mark.parametrize(
    ("sql", "column", "function", "why"),
    [
        ("SELECT set_config('search_path', 'evil', false)", 8, "set_config",
         f"{SESSION} (pass is_local = true)"),
        ("SELECT 1 FROM t WHERE pg_catalog.set_config('work_mem', :m, :local) = ''", 23,
         "set_config", f"{SESSION} (pass is_local = true)"),
        ("SELECT set_config('app.clinic_id', :other, true)", 8, "set_config", CONTEXT),
        ("SELECT set_config('App.Actor_Id', :other, true)", 8, "set_config", CONTEXT),
        ("SELECT set_config('role', 'hcrepo_owner', true)", 8, "set_config", CONTEXT),
        ("SELECT set_config(:name, :value, true)", 8, "set_config", CONTEXT),
        ("SELECT x FROM (SELECT pg_advisory_lock(:key) AS x) AS s", 23, "pg_advisory_lock",
         f"{SESSION} (use pg_advisory_xact_lock)"),
        ("UPDATE t SET a = 1 WHERE pg_try_advisory_lock_shared(1)", 26,
         "pg_try_advisory_lock_shared", f"{SESSION} (use pg_advisory_xact_lock)"),
        ("SELECT pg_advisory_unlock_all()", 8, "pg_advisory_unlock_all",
         f"{SESSION} (use pg_advisory_xact_lock)"),
    ],
)
def test_functions_that_change_the_session_or_the_context_are_refused(
    sql: str, column: int, function: str, why: str
) -> None:
    found = error(f"-- name: a\n{sql}")
    assert (found.line, found.column) == (2, column)
    assert str(found).endswith(f"[a]: {function}() {why}")


def test_transaction_local_settings_and_locks_are_allowed() -> None:
    assert one("-- name: a\nSELECT set_config('work_mem', :v, true)").returns_rows
    assert not one("-- name: a\nSELECT pg_advisory_xact_lock(:key)").is_write


def test_every_shipped_and_test_sql_file_still_loads() -> None:
    root = Path(__file__).parents[1]
    files = sorted([*root.glob("sql/*.sql"), *root.glob("tests/sql/*.sql"),
                    *root.glob("benchmarks/sql/*.sql")])
    assert len(files) > 10
    for path in files:
        assert parse(path.read_text(encoding="utf-8"), str(path)), path


def test_sql_before_the_first_block() -> None:
    assert str(error("SELECT 1\n-- name: a\nSELECT 1")) == (
        "f.sql:1:1: SQL before the first '-- name:' line")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SqlFileError, match=r"missing\.sql:1: cannot read SQL file"):
        load(tmp_path / "missing.sql")
