"""Property: whatever the interleaving of reads, writes and open units of work by clinics
A, B and C through hcrepo, no call returns or changes another clinic's rows.

A model holds the committed phone of every patient plus each open unit's pending writes;
every read through hcrepo must equal the model's view for the acting clinic, every attempt
on another clinic's patient must find nothing, and the database must end equal to the model.
The pool is smaller than the number of actors, so connections pass between clinics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcrepo import Database, RowSecurityViolation, Settings, UnitOfWork
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, new_clinic

ACTIONS = ("read_all", "read_one", "stream", "write", "insert_elsewhere", "begin", "commit",
           "rollback")
PHONES = ("+1 555 0001", "+1 555 0002", "+1 555 0003", None)


@dataclass(frozen=True)
class World:
    db: Database
    clinics: tuple[Clinic, Clinic, Clinic]
    superuser_url: str


@pytest.fixture(scope="module")
def world(migrated_db: ServerDatabase) -> Iterator[World]:
    clinics = tuple(new_clinic(migrated_db.superuser_url, patients=3) for _ in range(3))
    settings_ = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=2, pool_max=4)
    with Database(settings_) as db:
        yield World(db, clinics, migrated_db.superuser_url)  # type: ignore[arg-type]


@dataclass
class Model:
    committed: dict[UUID, str | None]
    owner: dict[UUID, int]
    units: dict[int, tuple[UnitOfWork, dict[UUID, str | None]]] = field(default_factory=dict)

    def view(self, clinic: int) -> dict[UUID, str | None]:
        seen = {p: phone for p, phone in self.committed.items() if self.owner[p] == clinic}
        if clinic in self.units:
            seen.update(self.units[clinic][1])
        return seen


def committed_phones(world: World) -> dict[UUID, str | None]:
    patients = [p for c in world.clinics for p in c.patient_ids]
    with psycopg.connect(world.superuser_url) as conn:
        rows = conn.execute(
            "SELECT id, phone FROM patients WHERE id = ANY(%s)", [patients]
        ).fetchall()
    return dict(rows)


Step = tuple[int, str, int, int, str | None]
steps = st.lists(
    st.tuples(
        st.integers(0, 2),  # acting clinic
        st.sampled_from(ACTIONS),
        st.integers(0, 2),  # clinic of the targeted patient
        st.integers(0, 2),  # which of its patients
        st.sampled_from(PHONES),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(program=steps)
def test_no_interleaving_crosses_clinics(world: World, program: list[Step]) -> None:
    model = Model(
        committed=committed_phones(world),
        owner={p: n for n, c in enumerate(world.clinics) for p in c.patient_ids},
    )
    try:
        for step in program:
            run_step(world, model, step)
        for clinic in list(model.units):
            finish(model, clinic, commit=True)
    finally:
        for clinic in list(model.units):
            finish(model, clinic, commit=False)
    assert committed_phones(world) == model.committed


def run_step(world: World, model: Model, step: Step) -> None:
    actor, action, target, index, phone = step
    me = world.clinics[actor]
    patient = world.clinics[target].patient_ids[index]
    mine = target == actor
    unit = model.units.get(actor)
    with world.db.context(clinic_id=me.id, actor_id=me.actor_id):
        runner: Any = unit[0] if unit else world.db
        repo = Clinical(runner)
        if action == "read_all":
            check_rows(repo.patients(), me, model.view(actor))
        elif action == "stream":
            check_rows(list(repo.stream_patients()), me, model.view(actor))
        elif action == "read_one":
            row = repo.patient(id=patient)
            if mine:
                assert row is not None and row.clinic_id == me.id
                assert row.phone == model.view(actor)[patient]
            else:
                assert row is None
        elif action == "write":
            changed = repo.set_phone(id=patient, phone=phone)  # type: ignore[arg-type]
            assert changed == (1 if mine else 0)
            if mine:
                (unit[1] if unit else model.committed)[patient] = phone
        elif action == "insert_elsewhere":
            other = world.clinics[(actor + 1) % 3].id
            with pytest.raises(RowSecurityViolation):
                if unit:
                    with unit[0].savepoint():
                        repo.add_patient(clinic_id=other, mrn="never stored")
                else:
                    repo.add_patient(clinic_id=other, mrn="never stored")
        elif action == "begin" and not unit:
            uow = world.db.unit_of_work()
            uow.__enter__()
            model.units[actor] = (uow, {})
        elif action in ("commit", "rollback") and unit:
            finish(model, actor, commit=action == "commit")


def finish(model: Model, clinic: int, *, commit: bool) -> None:
    uow, pending = model.units.pop(clinic)
    if commit:
        uow.__exit__(None, None, None)
        model.committed.update(pending)
    else:
        failure = RuntimeError("roll back")
        uow.__exit__(RuntimeError, failure, None)


def check_rows(rows: list[Any], me: Clinic, expected: dict[UUID, str | None]) -> None:
    assert {row.clinic_id for row in rows} <= {me.id}
    assert {row.id: row.phone for row in rows} == expected
