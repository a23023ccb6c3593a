"""Explicit clinic and actor on a repository override the ambient context."""

from __future__ import annotations

import uuid

import pytest

from hcrepo import ActorRequired, InvalidContext
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, MakeDatabase, new_clinic


@pytest.fixture
def other_clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, patients=3)


def test_an_explicit_clinic_overrides_the_ambient_one(
    make_db: MakeDatabase, clinic: Clinic, other_clinic: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id):
        mine = {row.id for row in Clinical(db).patients()}
        theirs = {row.id for row in Clinical(db, clinic_id=other_clinic.id).patients()}
        assert {row.id for row in Clinical(db).patients()} == mine  # ambient untouched
    assert mine == set(clinic.patient_ids)
    assert theirs == set(other_clinic.patient_ids)


def test_an_explicit_actor_lets_a_repository_write(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id):
        with pytest.raises(ActorRequired):
            Clinical(db).set_phone(id=clinic.patient_ids[0], phone="+1 555 0101")
        repo = Clinical(db, actor_id=clinic.actor_id)
        assert repo.set_phone(id=clinic.patient_ids[0], phone="+1 555 0101") == 1


def test_a_unit_of_work_keeps_the_context_it_was_opened_with(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db()
    with db.unit_of_work(clinic_id=clinic.id, actor_id=clinic.actor_id) as uow:
        assert len(Clinical(uow, clinic_id=clinic.id).patients()) == len(clinic.patient_ids)
        with pytest.raises(InvalidContext, match="clinic_id"):
            Clinical(uow, clinic_id=uuid.uuid4())
        with pytest.raises(InvalidContext, match="actor_id"):
            Clinical(uow, actor_id=uuid.uuid4())
