"""Repository contracts: the signature against the SQL, dynamic SQL without string building,
page caps, errors that name the query and never its arguments, and the query-name comment."""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from hcrepo import (
    ActorRequired,
    CheckViolation,
    Database,
    DatabaseError,
    HcrepoError,
    InvalidOrderBy,
    PageSizeExceeded,
    Repository,
    Settings,
    SqlFileError,
    TenantContextMissing,
    UniqueViolation,
    cached,
    query,
)
from hcrepo.healthcare import PatientRepository
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import Seed

SHAPES = (Path(__file__).parent / "sql" / "shapes.sql").resolve()
FAKE_PHI = "Zebulon Quixote-Phiworthy 078-05-1120"


class Number(BaseModel):
    n: int
    label: str


class Numbers(Repository, sql="sql/shapes.sql", tenant=False):
    @query("numbers_page")
    def page(self, *, n: int, sort: str, limit: int) -> list[Number]: ...

    @query("numbers_default_cap")
    def capped(self, *, n: int, limit: int = 1000) -> list[Number]: ...

    @query("numbers_in")
    def among(self, *, wanted: list[int], above: int | None = None) -> list[Number]: ...

    @query("a_uuid")
    def a_uuid(self, *, id: Any) -> uuid.UUID: ...

    @query("stat_probe")
    def stat_probe(self, *, marker: str) -> str: ...


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    with Database(Settings(database_url=migrated_db.app_url, pool_min=1, pool_max=2)) as database:
        yield database


def line_of(text: str) -> int:
    return SHAPES.read_text().splitlines().index(text) + 1


# --- the signature is the contract ----------------------------------------------------------


def definition_error(body: dict[str, Any]) -> str:
    with pytest.raises(SqlFileError) as caught:
        type("Bad", (Repository,), {"__module__": __name__, **body}, sql=str(SHAPES))
    return str(caught.value)


def declared(name: str, fn: Any, **options: Any) -> dict[str, Any]:
    return {"f": query(name, **options)(fn)}


def test_a_parameter_the_sql_lacks() -> None:
    def f(self: Any, *, n: int, extra: int) -> list[Number]: ...

    message = definition_error(declared("numbers", f))
    assert message.startswith(f"{SHAPES}:{line_of('-- name: numbers')} [numbers]: Bad.f (")
    assert message.endswith("): parameters the SQL lacks: extra")
    assert f"{Path(__file__).resolve()}:" in message  # where the method is declared


def test_a_sql_parameter_the_signature_lacks() -> None:
    def f(self: Any) -> list[Number]: ...

    assert definition_error(declared("numbers", f)).endswith(
        "SQL parameters the signature lacks: n")


def test_the_order_by_parameter_is_part_of_the_signature() -> None:
    def f(self: Any, *, n: int, limit: int) -> list[Number]: ...

    assert definition_error(declared("numbers_page", f)).endswith(
        "SQL parameters the signature lacks: sort")


def test_positional_parameters() -> None:
    def f(self: Any, n: int) -> list[Number]: ...

    assert definition_error(declared("numbers", f)).endswith(
        "parameters must be keyword-only (add '*'): n")


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (dict[str, int], "cannot map rows to dict[str, int]; use a pydantic model or a scalar"),
        (tuple[int, str], "cannot map rows to tuple[int, str]"),
        (Number | int | None, "only 'X | None' unions are supported"),
        (object, "cannot map rows to <class 'object'>"),
    ],
)
def test_unsupported_return_annotations(annotation: Any, message: str) -> None:
    def f(self: Any, *, n: int) -> None: ...

    f.__annotations__["return"] = annotation
    assert message in definition_error(declared("numbers", f))


def test_a_statement_without_rows_cannot_return_a_model() -> None:
    def f(self: Any, *, n: int) -> Number: ...

    assert definition_error(declared("fill_scratch", f)).endswith(
        "the statement returns no rows; annotate it '-> int' or '-> None'")


def test_missing_return_annotation_and_unknown_query() -> None:
    def f(self: Any, *, n: int):  # type: ignore[no-untyped-def]
        ...

    assert definition_error(declared("numbers", f)).endswith("missing return annotation")
    assert "no query named 'nope' in shapes.sql" in definition_error(declared("nope", f))


def test_cached_on_a_write() -> None:
    def f(self: Any, *, n: int) -> int: ...

    body = {"f": query("fill_scratch")(cached(ttl=60, tags=["n:{n}"])(f))}
    assert definition_error(body).endswith("@cached on a query that writes")


def test_invalidates_on_a_read_and_unknown_tag_fields() -> None:
    def f(self: Any, *, n: int) -> list[Number]: ...

    assert definition_error(declared("numbers", f, invalidates=["n:{n}"])).endswith(
        "invalidates= on a read query")
    body = {"f": query("numbers")(cached(ttl=60, tags=["n:{id}"])(f))}
    assert definition_error(body).endswith(
        "tag 'n:{id}' uses 'id', which is not a query parameter")


def test_sql_paths_are_relative_to_the_defining_module() -> None:
    assert Numbers.__sql_file__ == SHAPES


# --- dynamic SQL without string building -----------------------------------------------------


def test_order_by_comes_from_the_whitelist(db: Database) -> None:
    numbers = Numbers(db)
    assert [r.n for r in numbers.page(n=12, sort="n", limit=3)] == [1, 2, 3]
    assert [r.n for r in numbers.page(n=12, sort="-n", limit=3)] == [12, 11, 10]
    assert [r.n for r in numbers.page(n=12, sort="label", limit=4)] == [1, 10, 11, 12]
    assert [r.n for r in numbers.page(n=12, sort="-label", limit=2)] == [9, 8]
    for bad in ("n; DROP TABLE patients", "N", "--n", "g", FAKE_PHI):
        with pytest.raises(InvalidOrderBy) as caught:
            numbers.page(n=3, sort=bad, limit=3)
        assert str(caught.value).endswith("ORDER BY must be one of -label, -n, label, n")
        assert FAKE_PHI not in str(caught.value)


def test_page_sizes_are_capped(db: Database) -> None:
    numbers = Numbers(db)
    assert len(numbers.page(n=100, sort="n", limit=50)) == 50
    for bad in (51, 0, -1, True, "10", None):
        with pytest.raises(PageSizeExceeded, match="page size must be an integer from 1 to 50"):
            numbers.page(n=100, sort="n", limit=bad)  # type: ignore[arg-type]
    assert len(numbers.capped(n=1500)) == 1000  # the default cap is also the default size
    with pytest.raises(PageSizeExceeded, match="from 1 to 1000"):
        numbers.capped(n=1500, limit=1001)


def test_lists_and_optional_filters(db: Database) -> None:
    numbers = Numbers(db)
    assert [r.n for r in numbers.among(wanted=[2, 5, 9])] == [2, 5, 9]
    assert [r.n for r in numbers.among(wanted=[2, 5, 9], above=4)] == [5, 9]
    assert numbers.among(wanted=[]) == []


def test_keyword_mistakes_name_the_keywords_not_the_values(db: Database) -> None:
    with pytest.raises(TypeError) as caught:
        Numbers(db).among(wanted=[1], colour=FAKE_PHI)  # type: ignore[call-arg]
    assert str(caught.value) == "Numbers.among() got unexpected keyword arguments ['colour']"
    with pytest.raises(TypeError, match=r"Numbers.page\(\) missing keyword argument 'n'"):
        Numbers(db).page(sort="n", limit=1)  # type: ignore[call-arg]


# --- errors never echo parameter values ------------------------------------------------------


def assert_no_phi(error: BaseException) -> None:
    # A logged traceback shows the whole exception chain, so it is checked too.
    logged = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), *map(str, error.args), logged):
        assert FAKE_PHI not in text
        assert "078-05-1120" not in text


def test_driver_errors_do_not_echo_values(db: Database, seeded: Seed) -> None:
    with pytest.raises(DatabaseError) as caught:
        Numbers(db).a_uuid(id=FAKE_PHI)
    assert caught.value.sqlstate == "22P02"
    assert str(caught.value).startswith("22P02 InvalidTextRepresentation")
    assert "a_uuid (" in str(caught.value)
    assert_no_phi(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    patients = PatientRepository(db)
    with db.context(clinic_id=seeded.a.id, actor_id=seeded.a.user_ids[0]):
        with pytest.raises(CheckViolation) as check:
            patients.create(mrn=str(uuid.uuid4()), first_name=FAKE_PHI, last_name=FAKE_PHI,
                            date_of_birth=date(1990, 1, 1), sex=FAKE_PHI)  # type: ignore[arg-type]
        assert check.value.constraint == "patients_sex_check"
        assert_no_phi(check.value)
        existing = patients.get(id=seeded.a.patient_ids[0])
        assert existing is not None
        with pytest.raises(UniqueViolation) as unique:
            patients.create(mrn=existing.mrn, first_name=FAKE_PHI, last_name=FAKE_PHI,
                            date_of_birth=date(1990, 1, 1), sex="other")
        assert unique.value.constraint == "patients_clinic_id_mrn_key"
        assert_no_phi(unique.value)
        assert existing.mrn not in str(unique.value)


def test_context_errors_name_the_query(db: Database, seeded: Seed) -> None:
    patients = PatientRepository(db)
    with pytest.raises(TenantContextMissing) as missing:
        patients.by_mrn(mrn=FAKE_PHI)
    assert "get_patient_by_mrn (" in str(missing.value)
    assert_no_phi(missing.value)
    with db.context(clinic_id=seeded.a.id), pytest.raises(ActorRequired) as no_actor:
        patients.rename(id=seeded.a.patient_ids[0], first_name=FAKE_PHI, last_name=FAKE_PHI)
    assert "update_patient_name (" in str(no_actor.value)
    assert_no_phi(no_actor.value)
    assert isinstance(no_actor.value, HcrepoError)


# --- the query name travels with the statement ----------------------------------------------


def test_the_query_name_is_visible_in_pg_stat_statements(
    db: Database, migrated_db: ServerDatabase
) -> None:
    marker = uuid.uuid4().hex
    assert Numbers(db).stat_probe(marker=marker) == marker
    superuser = migrated_db.server.superuser_url
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        rows = conn.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s AND s.query LIKE %s",
            [migrated_db.dbname, "%hcrepo:stat_probe%"],
        ).fetchall()
    assert rows, "no statement carrying /* hcrepo:stat_probe */"
    assert all(query.startswith("/* hcrepo:stat_probe */ SELECT $1::text") for query, _ in rows)
