"""The ambient clinic and actor: pooled connections, threads, thread pools, generators,
nesting, explicit overrides, and the cross-clinic `for_each_clinic`."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg
import pytest

from hcrepo import (
    Database,
    HcrepoError,
    InvalidContext,
    TenantContextMissing,
    UnitOfWork,
    bind_context,
)
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import Seed
from tests.support.repos import (
    Clinic,
    Clinical,
    MakeDatabase,
    PatientRow,
    Probe,
    Session,
    new_clinic,
)

WAIT = 10.0



@pytest.fixture(scope="module")
def clinics(migrated_db: ServerDatabase) -> list[Clinic]:
    """Sixteen clinics with two patients each, made once for this module."""
    return [new_clinic(migrated_db.superuser_url, patients=2) for _ in range(16)]


def who(runner: Database | UnitOfWork) -> tuple[str | None, str | None]:
    probe = Session(runner).probe()
    return probe.clinic, probe.actor


def ids(rows: list[PatientRow]) -> set[UUID]:
    return {row.id for row in rows}


# --- pooled connections -------------------------------------------------------------------


def test_a_single_pooled_connection_never_carries_a_context_over(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    a, b = clinics[0], clinics[1]
    pids = set()
    for _ in range(3):
        with db.context(clinic_id=a.id, actor_id=a.actor_id):
            assert who(db) == (str(a.id), str(a.actor_id))
            assert ids(Clinical(db).patients()) == set(a.patient_ids)
            with db.unit_of_work() as uow:
                assert who(uow) == (str(a.id), str(a.actor_id))
                pids.add(uow.backend_pid)
        assert who(db) == ("", "")
        with db.unit_of_work() as uow:
            assert who(uow) == ("", "")
        with db.context(clinic_id=b.id):
            assert ids(Clinical(db).patients()) == set(b.patient_ids)
            assert ids(list(Clinical(db).stream_patients())) == set(b.patient_ids)
            with db.unit_of_work() as uow:
                assert ids(Clinical(uow).patients()) == set(b.patient_ids)
                pids.add(uow.backend_pid)
        with db.unit_of_work(clinic_id=b.id) as uow:
            Clinical(uow).patients()
        # Untouched by hcrepo, the connection itself holds no clinic either.
        with db._router.primary.connection() as conn:
            pids.add(conn.info.backend_pid)
            row = conn.execute("SELECT current_setting('app.clinic_id', true)").fetchone()
            assert row in (("",), (None,))
            assert conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)
    assert len(pids) == 1  # it really was one connection all along


def test_sixteen_threads_with_their_own_clinics_never_see_each_other(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db(pool_min=4, pool_max=4)  # fewer connections than clinics: they are shared
    start = threading.Barrier(len(clinics))
    backends: list[set[int]] = [set() for _ in clinics]

    def work(n: int) -> None:
        mine = clinics[n]
        other = clinics[(n + 1) % len(clinics)]
        with db.context(clinic_id=mine.id, actor_id=mine.actor_id):
            start.wait(WAIT)
            for round_ in range(10):
                assert who(db) == (str(mine.id), str(mine.actor_id))
                rows = Clinical(db).patients()
                assert ids(rows) == set(mine.patient_ids)
                assert {row.clinic_id for row in rows} == {mine.id}
                assert Clinical(db).patient(id=other.patient_ids[0]) is None
                assert Clinical(db).set_phone(id=other.patient_ids[0], phone="intruder") == 0
                with db.unit_of_work() as uow:
                    backends[n].add(uow.backend_pid)
                    repo = Clinical(uow)
                    assert repo.set_phone(id=mine.patient_ids[round_ % 2], phone=f"{n}") == 1
                    assert ids(repo.patients()) == set(mine.patient_ids)

    with ThreadPoolExecutor(len(clinics)) as pool:
        for future in [pool.submit(work, n) for n in range(len(clinics))]:
            future.result(WAIT * 3)
    assert len(set().union(*backends)) <= 4
    # Every clinic holds its own writes and nobody else's.
    for n, clinic in enumerate(clinics):
        with db.context(clinic_id=clinic.id):
            assert {row.phone for row in Clinical(db).patients()} == {f"{n}"}


# --- threads, thread pools, generators ------------------------------------------------------


def test_thread_pools_get_the_context_only_when_it_is_bound(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db()
    a = clinics[0]
    with ThreadPoolExecutor(2) as pool, db.context(clinic_id=a.id, actor_id=a.actor_id):
        bound = pool.submit(bind_context(lambda: ids(Clinical(db).patients())))
        assert bound.result(WAIT) == set(a.patient_ids)
        bound_who = pool.submit(bind_context(who), db)
        assert bound_who.result(WAIT) == (str(a.id), str(a.actor_id))
        unbound = pool.submit(lambda: Clinical(db).patients())
        with pytest.raises(TenantContextMissing):
            unbound.result(WAIT)
        # The binding is a snapshot: a later change in the caller does not leak into it.
        task = bind_context(who)
        with db.context(clinic_id=clinics[1].id):
            assert pool.submit(task, db).result(WAIT) == (str(a.id), str(a.actor_id))


def test_a_stream_keeps_the_context_it_was_created_in(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db()
    a, b = clinics[0], clinics[1]
    with db.context(clinic_id=a.id):
        stream = Clinical(db).stream_patients()
        later = Clinical(db).stream_patients()
    assert ids(list(stream)) == set(a.patient_ids)  # consumed with no context at all
    with db.context(clinic_id=b.id):
        assert ids(list(later)) == set(a.patient_ids)  # consumed inside another clinic


def test_a_stream_inside_a_unit_of_work_stays_in_its_transaction(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db()
    a = clinics[2]
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        with db.unit_of_work() as uow:
            repo = Clinical(uow)
            stream = repo.stream_patients()
            # Runs before the stream is first read: still inside the transaction's context.
            assert repo.set_phone(id=a.patient_ids[0], phone="in transaction") == 1
            phones = {row.id: row.phone for row in stream}
            unread = repo.stream_patients()
            next(unread)
        assert phones[a.patient_ids[0]] == "in transaction"
        with pytest.raises(HcrepoError, match="before the unit ends"):
            next(unread)  # its connection went back to the pool: never used again
        with pytest.raises(RuntimeError), db.unit_of_work() as uow:
            Clinical(uow).set_phone(id=a.patient_ids[0], phone="rolled back")
            next(Clinical(uow).stream_patients())
            raise RuntimeError("roll back with a cursor open")
        assert Clinical(db).patient(id=a.patient_ids[0]).phone == "in transaction"  # type: ignore[union-attr]


def test_nesting_restores_the_outer_context(make_db: MakeDatabase, clinics: list[Clinic]) -> None:
    db = make_db()
    a, b = clinics[0], clinics[1]
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        with db.context(clinic_id=b.id):
            assert who(db) == (str(b.id), str(a.actor_id))  # the actor is inherited
            with db.context(actor_id=None):
                assert who(db) == (str(b.id), "")
            assert who(db) == (str(b.id), str(a.actor_id))
        assert who(db) == (str(a.id), str(a.actor_id))
        with pytest.raises(LookupError), db.context(clinic_id=None):
            assert who(db) == ("", str(a.actor_id))
            raise LookupError("leave the block by an exception")
        assert who(db) == (str(a.id), str(a.actor_id))
    assert who(db) == ("", "")


def test_explicit_arguments_override_the_ambient_context(
    make_db: MakeDatabase, clinics: list[Clinic]
) -> None:
    db = make_db()
    a, b = clinics[0], clinics[1]
    actor = uuid.uuid4()
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        with db.unit_of_work(clinic_id=b.id) as uow:
            assert who(uow) == (str(b.id), str(a.actor_id))
            # a's doctor is no member of b: no role there, no patients (migrations/0007).
            assert ids(Clinical(uow).patients()) == set()
        with db.unit_of_work(clinic_id=b.id, actor_id=b.actor_id) as uow:
            assert ids(Clinical(uow).patients()) == set(b.patient_ids)
        with db.unit_of_work(clinic_id=str(b.id), actor_id=actor) as uow:
            assert who(uow) == (str(b.id), str(actor))
        with db.unit_of_work(clinic_id=None) as uow:
            assert who(uow) == ("", str(a.actor_id))
            with pytest.raises(TenantContextMissing):
                Clinical(uow).patients()
        assert db.transaction(who, clinic_id=b.id, actor_id=actor) == (str(b.id), str(actor))
        assert who(db) == (str(a.id), str(a.actor_id))


@pytest.mark.parametrize("bad", ["not-a-uuid", 42, b"bytes"])
def test_context_ids_must_be_uuids(make_db: MakeDatabase, bad: Any) -> None:
    db = make_db()
    with pytest.raises(InvalidContext, match="clinic_id must be a UUID"), db.context(clinic_id=bad):
        pass
    with pytest.raises(InvalidContext, match="actor_id must be a UUID"):
        db.unit_of_work(actor_id=bad)


# --- cross-clinic jobs ------------------------------------------------------------------------


def test_for_each_clinic_runs_once_per_clinic_in_its_own_context(
    make_db: MakeDatabase, clinics: list[Clinic], seeded: Seed, migrated_db: ServerDatabase
) -> None:
    db = make_db()
    with psycopg.connect(migrated_db.superuser_url) as su:
        directory = {row[0] for row in su.execute("SELECT id FROM clinics").fetchall()}
        per_clinic = dict(
            su.execute("SELECT clinic_id, count(*) FROM patients GROUP BY clinic_id").fetchall()
        )
        bypass = su.execute(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = 'hcrepo_app'"
        ).fetchone()
    assert bypass == (False,)
    calls: list[UUID] = []

    def nightly(clinic_id: UUID) -> tuple[Probe, list[PatientRow]]:
        calls.append(clinic_id)
        return Session(db).probe(), Clinical(db).patients()

    # A clinic-level job (no actor): an actor would need a membership in every clinic to
    # see its patients (migrations/0007).
    with db.context(actor_id=None):
        outcome = db.for_each_clinic(nightly)
        assert who(db) == ("", "")  # the caller's context is back
    assert sorted(calls) == sorted(directory)  # once per clinic
    assert set(outcome) == directory
    for clinic_id, (probe, rows) in outcome.items():
        assert (probe.clinic, probe.actor) == (str(clinic_id), "")
        assert (probe.role, probe.row_security) == ("hcrepo_app", "on")
        assert {row.clinic_id for row in rows} <= {clinic_id}
        assert len(rows) == per_clinic.get(clinic_id, 0)
    assert ids(outcome[seeded.a.id][1]) == set(seeded.a.patient_ids)
