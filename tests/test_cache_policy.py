"""Cache keys against real Redis and PostgreSQL: who asks is part of the key, and every
spelling of an argument reaches the same entry and the same tags."""

from __future__ import annotations

import uuid

from hcrepo import Repository, cached, query
from hcrepo.healthcare import PatientRepository
from tests.plugins.database import Database as ServerDatabase
from tests.support.cache import CachedDatabase, CacheRepo, Counts
from tests.support.repos import new_clinic, staff_member


class ActorSetting(Repository, sql="sql/cache.sql"):
    @query("cache_actor_setting")
    @cached(ttl=60)
    def actor(self) -> str: ...


def test_a_result_the_actor_shapes_is_never_served_to_another_actor(
    cached_db: CachedDatabase, migrated_db: ServerDatabase
) -> None:
    clinic = new_clinic(migrated_db.superuser_url)
    db = cached_db()
    repo = ActorSetting(db)
    a, b = uuid.uuid4(), uuid.uuid4()
    counts = Counts("cache_actor_setting")
    for _ in range(2):
        for actor in (a, b, None):
            with db.context(clinic_id=clinic.id, actor_id=actor):
                assert repo.actor() == ("" if actor is None else str(actor))
    assert counts["misses"] == 3 and counts["hits"] == 3  # one entry per actor, each reused


def test_queries_independent_of_the_actor_share_entries_among_a_clinics_staff(
    cached_db: CachedDatabase, migrated_db: ServerDatabase
) -> None:
    clinic = new_clinic(migrated_db.superuser_url, patients=2)
    doctors = [clinic.actor_id, *(staff_member(migrated_db.superuser_url, clinic.id, "doctor")
                                  for _ in range(2))]
    db = cached_db()
    keyed, shared = Counts("cache_patient_count"), Counts("get_patient")
    for doctor in doctors:
        # Entries are shared among actors claiming one role: with no role claimed, the
        # actor's membership decides the role, so the actor stays in the key.
        with db.context(clinic_id=clinic.id, actor_id=doctor, role="doctor"):
            assert CacheRepo(db).count() == 2  # declares no independence: keyed by actor
            assert PatientRepository(db).get(id=clinic.patient_ids[0]) is not None
    assert keyed["misses"] == 3 and keyed["hits"] == 0
    assert shared["misses"] == 1 and shared["hits"] == 2  # shipped: independent_of actor_id


def test_with_no_role_claimed_entries_are_not_shared_among_actors(
    cached_db: CachedDatabase, migrated_db: ServerDatabase
) -> None:
    """The membership role stands in for an unclaimed one, and it comes from the actor: a
    receptionist never gets the entry a doctor filled, even for an actor-independent query."""
    clinic = new_clinic(migrated_db.superuser_url, patients=1)
    other_doctor = staff_member(migrated_db.superuser_url, clinic.id, "doctor")
    db = cached_db()
    shared = Counts("get_patient")
    for actor in (clinic.actor_id, other_doctor, clinic.actor_id):
        with db.context(clinic_id=clinic.id, actor_id=actor):
            assert PatientRepository(db).get(id=clinic.patient_ids[0]) is not None
    assert shared["misses"] == 2 and shared["hits"] == 1


def test_a_write_spelling_the_id_otherwise_still_invalidates_the_read(
    cached_db: CachedDatabase, migrated_db: ServerDatabase
) -> None:
    clinic = new_clinic(migrated_db.superuser_url)
    patient = clinic.patient_ids[0]
    db = cached_db()
    repo = CacheRepo(db)
    counts = Counts("cache_patient")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        before = repo.patient(id=patient)
        assert before is not None and before.phone is None
        assert repo.patient(id=f"{{{str(patient).upper()}}}") == before  # type: ignore[arg-type]
        assert counts["misses"] == 1 and counts["hits"] == 1  # one entry, however spelled
        spellings = [str(patient).upper(), f"{{{patient}}}", str(patient), patient.hex]
        for number, spelling in enumerate(spellings):
            phone = f"+1 555 01{number:02d}"
            repo.set_phone_only(id=spelling, phone=phone)  # type: ignore[arg-type]
            after = repo.patient(id=patient)
            assert after is not None and after.phone == phone
