"""The pipeline's prepared-statement cache on a real connection: nothing one call leaves
behind (a failed PREPARE, a plan a schema change made stale) breaks the next call."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hcrepo import pipeline
from hcrepo.pipeline import HcConnection, PipelineError, Statement
from tests.plugins.database import Database


def _connect(url: str) -> HcConnection:
    # As the pools make them (hcrepo/routing/node.py): autocommit, psycopg's own prepares off.
    return HcConnection.connect(url, autocommit=True, prepare_threshold=None)


@pytest.fixture
def app_conn(migrated_db: Database) -> Iterator[HcConnection]:
    with _connect(migrated_db.app_url) as conn:
        yield conn


def _text(conn: HcConnection, sql: str) -> str:
    (result,) = pipeline.run(conn, [Statement(sql)])
    value = result.get_value(0, 0)
    assert value is not None
    return bytes(value).decode()


def test_a_failed_prepare_leaves_new_statements_working(app_conn: HcConnection) -> None:
    # The PREPARE fails and is forgotten; statements prepared afterwards get names of their own.
    with pytest.raises(PipelineError) as failed:
        pipeline.run(app_conn, [
            Statement("SELECT no_such_column FROM clinics"),
            Statement("SELECT 'skipped with it'::text"),
        ])
    assert (failed.value.error.sqlstate, failed.value.index) == ("42703", 0)
    assert _text(app_conn, "SELECT 'after the sync'::text") == "after the sync"
    for n in range(5):
        assert _text(app_conn, f"SELECT 'new statement {n}'::text") == f"new statement {n}"
    assert len(app_conn.prepared) == 6


def test_a_plan_made_stale_by_a_schema_change_is_prepared_again(
    migrated_db: Database,
) -> None:
    # The superuser may create the temporary table the application role may not.
    with _connect(migrated_db.superuser_url) as conn:
        conn.execute("CREATE TEMP TABLE drifting (a text)")
        conn.execute("INSERT INTO drifting VALUES ('x')")
        (before,) = pipeline.run(conn, [Statement("SELECT * FROM drifting")])
        conn.execute("ALTER TABLE drifting ADD COLUMN b text")
        with pytest.raises(PipelineError) as stale:
            pipeline.run(conn, [Statement("SELECT * FROM drifting")])
        assert stale.value.error.sqlstate == "0A000"  # cached plan must not change result type
        (after,) = pipeline.run(conn, [Statement("SELECT * FROM drifting")])
        assert (before.nfields, after.nfields) == (1, 2)
        assert _text(conn, "SELECT 'still fine'::text") == "still fine"
