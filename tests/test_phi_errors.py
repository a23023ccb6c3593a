"""No value of a call reaches an error a caller can see: not its message, not anything it
chains (walked by hand, as log tools do), and not the frames loguru prints by default."""

from __future__ import annotations

import io
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any
from uuid import UUID

import pytest
from loguru import logger
from pydantic import BaseModel, StringConstraints

from hcrepo import (
    DatabaseError,
    HcrepoError,
    InvalidRow,
    Repository,
    UniqueViolation,
    UnitOfWork,
    query,
)
from hcrepo.pipeline import Statement
from tests.support.errors import exception_chain
from tests.support.repos import Clinic, MakeDatabase


class Strict(BaseModel):
    id: UUID
    mrn: Annotated[str, StringConstraints(max_length=3)]


class Leaky(Repository, sql="sql/phi_errors.sql"):
    @query("as_uuid", phi=True)
    def as_uuid(self, *, text: str) -> UUID: ...

    @query("stream_as_uuid", phi=True)
    def stream_as_uuid(self, *, text: str) -> Iterator[UUID]: ...

    @query("strict_patient", phi=True)
    def strict_patient(self, *, id: UUID) -> Strict | None: ...

    @query("add_patient", phi=True)
    def add_patient(self, *, clinic_id: UUID, mrn: str) -> UUID: ...


class Masked(dict[str, Any]):
    """Arguments the test's own frames hold without showing them (loguru prints the names on
    a failing line with their values: that the application's frames do is its own affair)."""

    def __repr__(self) -> str:
        return "<masked>"


def secret() -> str:
    return f"PHI-{uuid.uuid4().hex}"


def assert_nothing_carries(error: BaseException, value: str) -> None:
    for reached in exception_chain(error):
        assert value not in str(reached), type(reached)
        assert value not in repr(reached), type(reached)
        assert all(value not in repr(arg) for arg in reached.args), type(reached)
    assert value not in "".join(traceback.format_exception(error))


def failures(db: Any, clinic: Clinic) -> list[tuple[str, Callable[[], Any]]]:
    """(seeded value, a call that fails with it) for each way an error can carry a value."""
    taken, long_mrn, cast, streamed, in_unit, passed_on = (secret() for _ in range(6))
    duplicate = Masked(clinic_id=clinic.id, mrn=taken)
    Leaky(db).add_patient(**duplicate)
    patient = Leaky(db).add_patient(**Masked(clinic_id=clinic.id, mrn=long_mrn))
    bad_uuid, bad_in_stream = Masked(text=cast), Masked(text=streamed)
    bad_in_unit, bad_passed_on = Masked(text=in_unit), Masked(text=passed_on)

    def in_a_unit() -> None:
        with db.unit_of_work() as uow:
            Leaky(uow).as_uuid(**bad_in_unit)

    def through_a_transaction(uow: UnitOfWork, *, request: Masked) -> None:
        Leaky(uow).as_uuid(**request)

    return [
        (taken, lambda: Leaky(db).add_patient(**duplicate)),
        (long_mrn, lambda: Leaky(db).strict_patient(id=patient)),
        (cast, lambda: Leaky(db).as_uuid(**bad_uuid)),
        (streamed, lambda: list(Leaky(db).stream_as_uuid(**bad_in_stream))),
        (in_unit, in_a_unit),
        (passed_on, lambda: db.transaction(through_a_transaction, request=bad_passed_on)),
    ]


def test_errors_carry_no_value_in_anything_they_chain(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        cases = failures(db, clinic)
        kinds = []
        for value, call in cases:
            with pytest.raises(HcrepoError) as raised:
                call()
            kinds.append(type(raised.value))
            assert_nothing_carries(raised.value, value)
    assert kinds[0] is UniqueViolation
    assert kinds[1] is InvalidRow
    assert all(issubclass(kind, DatabaseError) for kind in kinds[2:])


def test_a_row_that_fails_its_model_names_the_field_and_rule(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        patient = Leaky(db).add_patient(**Masked(clinic_id=clinic.id, mrn=secret()))
        with pytest.raises(InvalidRow, match="mrn: string_too_long") as raised:
            Leaky(db).strict_patient(id=patient)
    assert raised.value.query == "strict_patient"


def test_loguru_defaults_print_no_value(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    sink = io.StringIO()
    handler = logger.add(sink, backtrace=True, diagnose=True, colorize=False)
    try:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            cases = failures(db, clinic)
            for _, call in cases:
                try:
                    call()
                except HcrepoError:
                    logger.exception("the call failed")
    finally:
        logger.remove(handler)
    printed = sink.getvalue()
    assert printed.count("the call failed") == len(cases)
    for value, _ in cases:
        assert value not in printed


def test_a_statement_shows_its_text_but_not_its_parameters() -> None:
    value = secret()
    shown = repr(Statement("SELECT $1", (value,)))
    assert value not in shown and "SELECT $1" in shown and "1 parameters" in shown
