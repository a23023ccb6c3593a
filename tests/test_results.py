"""Every result shape a return annotation can ask for, against the real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
import pytest
from pydantic import BaseModel

from hcrepo import Database, NotFound, QueryError, Repository, Settings, TooManyRows, query
from tests.plugins.database import Database as ServerDatabase


class Number(BaseModel):
    n: int
    label: str


class Shapes(Repository, sql="sql/shapes.sql", tenant=False):
    @query("numbers")
    def maybe(self, *, n: int) -> Number | None: ...

    @query("numbers")
    def exactly_one(self, *, n: int) -> Number: ...

    @query("numbers")
    def many(self, *, n: int) -> list[Number]: ...

    @query("numbers")
    def stream(self, *, n: int) -> Iterator[Number]: ...

    @query("count_numbers")
    def count(self, *, n: int) -> int: ...

    @query("a_uuid")
    def a_uuid(self, *, id: UUID) -> UUID: ...

    @query("a_text")
    def a_text(self, *, name: str) -> str: ...

    @query("a_timestamp")
    def a_timestamp(self, *, at: datetime) -> datetime: ...

    @query("a_null")
    def a_null(self) -> int | None: ...

    @query("two_columns")
    def two_columns(self) -> int: ...

    @query("labels_as_text")
    def validated(self, *, n: int) -> list[Number]: ...

    @query("fill_scratch")
    def fill_scratch(self, *, n: int) -> int: ...

    @query("bump_scratch")
    def bump_scratch(self, *, upto: int) -> int: ...

    @query("take_scratch")
    def take_scratch(self, *, n: int) -> int | None: ...

    @query("scratch_rows")
    def scratch_rows(self) -> list[int]: ...

    @query("scratch_rows")
    def stream_scratch(self) -> Iterator[int]: ...

    @query("notify")
    def notify(self, *, message: str) -> None: ...


class Wrong(BaseModel):
    n: int
    missing: str


class Mismatched(Repository, sql="sql/shapes.sql", tenant=False):
    @query("numbers")
    def wrong_model(self, *, n: int) -> list[Wrong]: ...


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    with Database(Settings(database_url=migrated_db.app_url, pool_min=1, pool_max=2)) as database:
        yield database


@pytest.fixture
def shapes(db: Database) -> Shapes:
    return Shapes(db)


def test_model_or_none(shapes: Shapes) -> None:
    assert shapes.maybe(n=0) is None
    assert shapes.maybe(n=1) == Number(n=1, label="row 1")
    with pytest.raises(TooManyRows) as caught:
        shapes.maybe(n=2)
    assert str(caught.value).startswith("numbers (")
    assert "shapes.sql:3): returned 2 rows; the method returns at most one" in str(caught.value)


def test_exactly_one(shapes: Shapes) -> None:
    assert shapes.exactly_one(n=1) == Number(n=1, label="row 1")
    with pytest.raises(NotFound, match="returned no row; the method returns exactly one"):
        shapes.exactly_one(n=0)
    with pytest.raises(TooManyRows, match="returned 3 rows"):
        shapes.exactly_one(n=3)


def test_list(shapes: Shapes) -> None:
    assert shapes.many(n=0) == []
    rows = shapes.many(n=3)
    assert rows == [Number(n=1, label="row 1"), Number(n=2, label="row 2"),
                    Number(n=3, label="row 3")]
    assert all(type(row) is Number for row in rows)


def test_iterator_crosses_cursor_chunks(shapes: Shapes) -> None:
    rows = shapes.stream(n=4500)  # three FETCHes of 2000
    assert not isinstance(rows, list)
    assert [row.n for row in rows] == list(range(1, 4501))
    assert list(shapes.stream(n=0)) == []


def test_abandoned_iterator_closes_its_cursor(shapes: Shapes, db: Database) -> None:
    rows = shapes.stream(n=10_000)
    assert next(rows).n == 1
    rows.close()  # closes the cursor and ends the transaction on the pooled connection
    for _ in range(3):  # every pooled connection is clean again
        assert shapes.count(n=5) == 5


def test_scalars(shapes: Shapes) -> None:
    assert shapes.count(n=7) == 7
    some = uuid.uuid4()
    assert shapes.a_uuid(id=some) == some
    assert shapes.a_text(name="world") == "hello world"
    noon = datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert shapes.a_timestamp(at=noon) == noon + timedelta(days=1)
    assert shapes.a_null() is None


def test_a_scalar_needs_exactly_one_column(shapes: Shapes) -> None:
    with pytest.raises(QueryError, match="returns 2 columns; a scalar result needs exactly one"):
        shapes.two_columns()


def test_rows_must_fit_the_model(db: Database) -> None:
    with pytest.raises(QueryError) as caught:
        Mismatched(db).wrong_model(n=1)
    assert "columns not in Wrong: label; fields with no column: missing" in str(caught.value)


def test_rows_are_validated_by_the_model(shapes: Shapes) -> None:
    # The column is text; the model says int: pydantic validates (and here coerces) it.
    assert shapes.validated(n=1) == [Number(n=1, label="row 1")]


@pytest.fixture
def scratch_table(migrated_db: ServerDatabase) -> Iterator[None]:
    """A table the application role may write (it may not create temporary ones)."""
    with psycopg.connect(migrated_db.owner_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE hcrepo_scratch (n int NOT NULL)")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON hcrepo_scratch TO hcrepo_app")
    yield
    with psycopg.connect(migrated_db.owner_url, autocommit=True) as conn:
        conn.execute("DROP TABLE hcrepo_scratch")


@pytest.mark.usefixtures("scratch_table")
def test_rowcounts_none_and_scalar_or_none_in_a_unit_of_work(db: Database) -> None:
    with db.unit_of_work(actor_id=uuid.uuid4()) as uow:
        scratch = Shapes(uow)
        assert scratch.fill_scratch(n=5) == 5
        assert scratch.bump_scratch(upto=3) == 3
        assert scratch.bump_scratch(upto=0) == 0
        assert scratch.take_scratch(n=4) == 4
        assert scratch.take_scratch(n=4) is None
        assert scratch.scratch_rows() == [5, 101, 102, 103]
        assert list(scratch.stream_scratch()) == [5, 101, 102, 103]


def test_nothing(shapes: Shapes, db: Database) -> None:
    with db.context(actor_id=uuid.uuid4()):
        assert shapes.notify(message="hi") is None
