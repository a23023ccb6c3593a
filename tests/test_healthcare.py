"""The healthcare repositories against the migrated schema, as the application role.

Each test works in a clinic of its own (made through the repositories themselves), so tests
can write freely and never see each other's rows; the seeded clinics are only read.
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import psycopg
import pytest

from hcrepo import (
    Database,
    ExclusionViolation,
    InvalidOrderBy,
    PageSizeExceeded,
    Settings,
    TenantContextMissing,
    UniqueViolation,
)
from hcrepo.healthcare import (
    AppointmentRepository,
    ClinicRepository,
    EncounterRepository,
    Patient,
    PatientRepository,
    PrescriptionRepository,
    ProviderRepository,
    StaffRepository,
    UserRepository,
)
from hcrepo.repository import Repository
from hcrepo.testing import RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import Seed

PHI_TABLES = {"patients", "patient_records", "appointments", "encounters", "prescriptions"}
REPOSITORIES: list[type[Repository]] = [
    ClinicRepository, UserRepository, StaffRepository, PatientRepository, ProviderRepository,
    AppointmentRepository, EncounterRepository, PrescriptionRepository,
]
NINE = datetime(2030, 3, 4, 9, tzinfo=UTC)
PAST = datetime(2021, 6, 1, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=4)
    with Database(settings) as database:
        yield database


@dataclass(frozen=True)
class Tenant:
    clinic_id: UUID
    actor_id: UUID
    provider_id: UUID
    admin_id: UUID

    def scope(self, db: Database) -> AbstractContextManager[object]:
        """The tenant's context, entered in the test itself: a fixture's block would end
        for the test as soon as the fixture yields."""
        return db.context(clinic_id=self.clinic_id, actor_id=self.actor_id)

    def admin(self, db: Database) -> AbstractContextManager[object]:
        """The context of the clinic's admin, who manages staff, providers and the clinic."""
        return db.context(clinic_id=self.clinic_id, actor_id=self.admin_id)


@pytest.fixture
def tenant(db: Database, seeded: Seed) -> Tenant:
    """A new clinic (made by a seeded doctor) whose first member is an admin, who onboards a
    doctor and makes the doctor a provider; tests enter the doctor's context with
    `tenant.scope(db)`, the admin's with `tenant.admin(db)`."""
    with db.context(actor_id=seeded.a.user_ids[0]):
        clinic = ClinicRepository(db).create(name=f"Clinic {uuid.uuid4().hex[:8]}",
                                             timezone="America/New_York")
    with db.context(clinic_id=clinic.id, actor_id=seeded.a.user_ids[0]):
        admin = UserRepository(db).onboard(
            email=f"{uuid.uuid4().hex[:12]}@example.invalid", full_name="Ad Min", role="admin"
        )
    with db.context(clinic_id=clinic.id, actor_id=admin.id):
        actor = UserRepository(db).onboard(
            email=f"{uuid.uuid4().hex[:12]}@example.invalid", full_name="Dr Test", role="doctor"
        )
        provider = ProviderRepository(db).create(display_name="Dr Test", user_id=actor.id,
                                                 specialty="family medicine")
    return Tenant(clinic.id, actor.id, provider.id, admin.id)


def new_patient(db: Database, last_name: str = "Doe", **fields: object) -> Patient:
    values: dict[str, object] = {
        "mrn": uuid.uuid4().hex[:10], "first_name": "Jane", "last_name": last_name,
        "date_of_birth": date(1980, 5, 17), "sex": "female", **fields,
    }
    return PatientRepository(db).create(**values)  # type: ignore[arg-type]


# --- declarations -------------------------------------------------------------------------


def test_every_query_touching_phi_tables_is_marked_phi() -> None:
    not_phi = {"PatientRepository.count"}  # a number of patients identifies nobody
    for repository in REPOSITORIES:
        for plan in repository.__plans__.values():
            touches_phi = bool(plan.query.tables & PHI_TABLES) and plan.method not in not_phi
            assert plan.phi == touches_phi, plan.method


def test_reads_by_id_are_cached_and_the_writes_that_change_them_invalidate() -> None:
    patient = PatientRepository.__plans__
    assert patient["get"].cache is not None
    assert patient["get"].cache.ttl == "patient"
    assert patient["get"].cache.tags == ("patient:{id}",)
    assert patient["update_contact"].invalidates == ("patient:{id}",)
    assert patient["rename"].invalidates == ("patient:{id}",)
    for repository in REPOSITORIES:
        plans = repository.__plans__
        if "get" not in plans:
            continue
        cache = plans["get"].cache
        assert cache is not None, repository.__name__
        tag = cache.tags[0]
        # UPDATE as a word: an INSERT that returns updated_at changes no cached row.
        updates = [p for p in plans.values() if p.is_write
                   and re.search(r"\bUPDATE\b", p.sql.upper()) and "id" in p.param_names]
        assert updates, repository.__name__
        for plan in updates:
            assert plan.invalidates == (tag,), plan.method


def test_only_the_clinic_directory_is_not_tenant_scoped() -> None:
    assert not ClinicRepository.__tenant_scoped__
    for repository in REPOSITORIES[1:]:
        assert repository.__tenant_scoped__, repository.__name__


# --- clinics, users, staff -------------------------------------------------------------------


def test_clinic_directory(db: Database, tenant: Tenant, seeded: Seed) -> None:
    with tenant.admin(db):
        clinics = ClinicRepository(db)
        mine = clinics.get(id=tenant.clinic_id)
        assert mine is not None and mine.timezone == "America/New_York"
        # The directory is readable from any clinic, and without one.
        with db.context(clinic_id=None):
            assert clinics.get(id=seeded.b.id) is not None
        assert clinics.update(id=tenant.clinic_id, name="Renamed", timezone="UTC") == 1
        assert clinics.update(id=seeded.b.id, name="Hijacked", timezone="UTC") == 0
        renamed = clinics.get(id=tenant.clinic_id)
        assert renamed is not None and renamed.name == "Renamed"


def test_clinic_directory_pages_with_a_keyset(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        clinics = ClinicRepository(db)
        seen: list[UUID] = []
        page = clinics.directory(limit=2)
        while page:
            assert len(page) <= 2
            seen.extend(c.id for c in page)
            page = clinics.directory(after_name=page[-1].name, after_id=page[-1].id, limit=2)
        everything = clinics.directory(limit=1000)
        assert seen == [c.id for c in everything]
        assert tenant.clinic_id in seen


def test_users_and_staff(db: Database, tenant: Tenant) -> None:
    with tenant.admin(db):
        users = UserRepository(db)
        email = f"{uuid.uuid4().hex[:12]}@example.invalid"
        nurse = users.onboard(email=email, full_name="Nurse Test", role="nurse")
        assert users.by_email(email=email) == nurse
        assert users.set_active(id=nurse.id, active=False) == 1
        fetched = users.get(id=nurse.id)
        assert fetched is not None and not fetched.active
        with pytest.raises(UniqueViolation) as caught:
            users.onboard(email=email, full_name="Someone Else", role="admin")
        assert email not in str(caught.value)

        staff = StaffRepository(db)
        assert {m.user_id for m in staff.members()} == {tenant.actor_id, tenant.admin_id,
                                                        nurse.id}
        assert staff.remove(user_id=nurse.id) == 1
        assert {m.user_id for m in staff.members()} == {tenant.actor_id, tenant.admin_id}
        # No membership, no account: the clinic no longer sees or changes it ...
        assert users.get(id=nurse.id) is None
        assert users.set_active(id=nurse.id, active=True) == 0
        # ... until it adds the user back by id.
        assert staff.add(user_id=nurse.id, role="nurse") == 1
        assert users.by_email(email=email) == fetched


def test_another_clinics_staff_is_out_of_reach(
    db: Database, tenant: Tenant, seeded: Seed, migrated_db: ServerDatabase
) -> None:
    with tenant.admin(db):
        users = UserRepository(db)
        doctor = seeded.b.user_ids[0]
        with psycopg.connect(migrated_db.superuser_url) as conn:
            row = conn.execute("SELECT email FROM users WHERE id = %s", [doctor]).fetchone()
        assert row is not None
        assert users.get(id=doctor) is None
        assert users.by_email(email=row[0]) is None
        assert users.set_active(id=doctor, active=False) == 0
        assert doctor not in {m.user_id for m in StaffRepository(db).members()}
        # Onboarding B's doctor's e-mail does not attach the account to this clinic.
        with pytest.raises(UniqueViolation):
            users.onboard(email=row[0], full_name="Taken Over", role="admin")
        assert users.get(id=doctor) is None


def test_a_user_of_two_clinics_is_seen_by_both(
    db: Database, tenant: Tenant, migrated_db: ServerDatabase
) -> None:
    with tenant.admin(db):
        users = UserRepository(db)
        nurse = users.onboard(email=f"{uuid.uuid4().hex[:12]}@example.invalid",
                              full_name="Nurse Shared", role="nurse")
        with db.context(actor_id=tenant.admin_id):
            other = ClinicRepository(db).create(name=f"Clinic {uuid.uuid4().hex[:8]}")
        # The admin administers the other clinic too (staff changes are an admin's).
        with psycopg.connect(migrated_db.superuser_url) as conn:
            conn.execute("INSERT INTO clinic_memberships (clinic_id, user_id, role)"
                         " VALUES (%s, %s, 'admin')", [other.id, tenant.admin_id])
        with db.context(clinic_id=other.id, actor_id=tenant.admin_id):
            assert users.get(id=nurse.id) is None
            assert StaffRepository(db).add(user_id=nurse.id, role="nurse") == 1
            assert users.get(id=nurse.id) == nurse
        assert users.get(id=nurse.id) == nurse


def test_onboarding_needs_a_clinic(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db), db.context(clinic_id=None), pytest.raises(TenantContextMissing):
        UserRepository(db).onboard(email=f"{uuid.uuid4().hex[:12]}@example.invalid",
                                   full_name="Nobody", role="nurse")


# --- patients ------------------------------------------------------------------------------


def test_patient_crud(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        patients = PatientRepository(db)
        created = new_patient(db, phone="+1 555 0100")  # SSNs: tests/test_encryption.py
        assert created.clinic_id == tenant.clinic_id
        assert patients.get(id=created.id) == created
        assert patients.by_mrn(mrn=created.mrn) == created
        assert patients.update_contact(id=created.id, phone=None, email="j@example.invalid",
                                       address="1 Main St") == 1
        assert patients.rename(id=created.id, first_name="Janet", last_name="Roe") == 1
        after = patients.get(id=created.id)
        assert after is not None
        assert (after.phone, after.email, after.first_name, after.last_name) == (
            None, "j@example.invalid", "Janet", "Roe")
        assert after.updated_at > created.updated_at
        assert patients.count() == 1
        assert [p.id for p in patients.stream_all()] == [created.id]


def test_patients_are_invisible_to_other_clinics(
    db: Database, tenant: Tenant, seeded: Seed
) -> None:
    with tenant.scope(db):
        created = new_patient(db)
        patients = PatientRepository(db)
        with db.context(clinic_id=seeded.a.id, actor_id=seeded.a.user_ids[0]):
            assert patients.get(id=created.id) is None
            assert patients.by_mrn(mrn=created.mrn) is None
            assert patients.count() == len(seeded.a.patient_ids)
        with db.context(clinic_id=None), pytest.raises(TenantContextMissing):
            patients.count()


def test_patient_search_filters_within_the_clinic(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        smith = new_patient(db, "Smith", first_name="Ann", date_of_birth=date(1970, 1, 2))
        smithers = new_patient(db, "Smithers", first_name="Bob")
        percent = new_patient(db, "100% Pure", first_name="Carl")
        patients = PatientRepository(db)
        assert {p.id for p in patients.search(name="smi")} == {smith.id, smithers.id}
        assert [p.id for p in patients.search(name="ANN")] == [smith.id]
        # Wildcards in the input are literal characters, not patterns.
        assert [p.id for p in patients.search(name="100%")] == [percent.id]
        assert patients.search(name="%") == []
        assert [p.id for p in patients.search(date_of_birth=date(1970, 1, 2))] == [smith.id]
        assert [p.id for p in patients.search(mrn=smithers.mrn)] == [smithers.id]
        assert patients.search(name="smi", mrn=percent.mrn) == []
        assert len(patients.search()) == 3


def test_patient_search_orders_by_whitelisted_columns(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        older = new_patient(db, "Young", date_of_birth=date(1950, 1, 1))
        younger = new_patient(db, "Old", date_of_birth=date(2000, 1, 1))
        patients = PatientRepository(db)
        assert [p.id for p in patients.search(sort="last_name")] == [younger.id, older.id]
        assert [p.id for p in patients.search(sort="-last_name")] == [older.id, younger.id]
        assert [p.id for p in patients.search(sort="date_of_birth")] == [older.id, younger.id]
        assert [p.id for p in patients.search(sort="-date_of_birth", limit=1)] == [younger.id]
        with pytest.raises(InvalidOrderBy):
            patients.search(sort="ssn")  # type: ignore[arg-type]
        with pytest.raises(PageSizeExceeded):
            patients.search(limit=201)


def test_patient_pages_walk_every_row_once(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        made = [new_patient(db, name) for name in ("Adams", "Baker", "Baker", "Clark", "Baker")]
        patients = PatientRepository(db)
        seen: list[UUID] = []
        page = patients.page(limit=2)
        while page:
            seen.extend(p.id for p in page)
            page = patients.page(after_last_name=page[-1].last_name, after_id=page[-1].id, limit=2)
        assert sorted(seen) == sorted(p.id for p in made)
        assert len(seen) == len(set(seen))
        expected = sorted(made, key=lambda p: (p.last_name, str(p.id)))
        assert seen == [p.id for p in expected]
        assert {p.last_name for p in patients.page(name="bak", limit=10)} == {"Baker"}


# --- providers -----------------------------------------------------------------------------


def test_providers(db: Database, tenant: Tenant) -> None:
    with tenant.admin(db):  # an admin adds providers
        providers = ProviderRepository(db)
        nurse = providers.create(display_name="Nurse Practitioner", specialty="triage")
        assert providers.get(id=nurse.id) == nurse
        assert [p.id for p in providers.find(specialty="triage")] == [nurse.id]
        assert providers.on_call() == []
        assert providers.set_on_call(id=nurse.id, on_call=True) == 1
        assert [p.id for p in providers.on_call()] == [nurse.id]
        assert providers.deactivate(id=nurse.id) == 1
        assert providers.set_on_call(id=nurse.id, on_call=True) == 0
        assert [p.id for p in providers.find()] == [tenant.provider_id]
        assert {p.id for p in providers.find(active=None)} == {tenant.provider_id, nurse.id}
        assert [p.id for p in providers.find(active=False)] == [nurse.id]


# --- appointments --------------------------------------------------------------------------


def test_book_cancel_and_reschedule(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        appointments = AppointmentRepository(db)
        patient = new_patient(db)
        other = new_patient(db)
        first = appointments.book(patient_id=patient.id, provider_id=tenant.provider_id,
                                  starts_at=NINE, ends_at=NINE + timedelta(minutes=30),
                                  reason="Follow-up")
        assert first.status == "scheduled"
        assert appointments.get(id=first.id) == first
        with pytest.raises(ExclusionViolation) as caught:
            appointments.book(patient_id=other.id, provider_id=tenant.provider_id,
                              starts_at=NINE + timedelta(minutes=15),
                              ends_at=NINE + timedelta(minutes=45), reason="Chest pain")
        assert caught.value.constraint == "appointments_no_double_booking"
        assert caught.value.sqlstate == "23P01"
        assert "Chest pain" not in str(caught.value)

        second = appointments.book(patient_id=other.id, provider_id=tenant.provider_id,
                                   starts_at=NINE + timedelta(minutes=30),
                                   ends_at=NINE + timedelta(minutes=60))
        with pytest.raises(ExclusionViolation):
            appointments.reschedule(id=second.id, starts_at=NINE,
                                    ends_at=NINE + timedelta(minutes=30))
        assert appointments.cancel(id=first.id) == 1
        assert appointments.cancel(id=first.id) == 0
        moved = appointments.reschedule(id=second.id, starts_at=NINE,
                                        ends_at=NINE + timedelta(minutes=30))
        assert moved is not None and moved.starts_at == NINE
        assert appointments.reschedule(id=first.id, starts_at=NINE,
                                       ends_at=NINE + timedelta(minutes=30)) is None
        assert appointments.set_status(id=second.id, status="checked_in") == 1
        checked_in = appointments.get(id=second.id)
        assert checked_in is not None and checked_in.status == "checked_in"
        assert [a.id for a in appointments.for_patient(patient_id=other.id, since=NINE)] == [
            second.id]


def test_provider_day_is_the_clinic_local_day(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        appointments = AppointmentRepository(db)
        patient = new_patient(db)

        def book(starts_at: datetime) -> UUID:
            return appointments.book(patient_id=patient.id, provider_id=tenant.provider_id,
                                     starts_at=starts_at,
                                     ends_at=starts_at + timedelta(minutes=20)).id

        # The clinic is in New York (UTC-5 in March before DST): 03:00 UTC is the evening before.
        evening_before = book(datetime(2030, 3, 4, 3, tzinfo=UTC))
        morning = book(datetime(2030, 3, 4, 14, tzinfo=UTC))
        late = book(datetime(2030, 3, 5, 4, 30, tzinfo=UTC))
        next_day = book(datetime(2030, 3, 5, 5, 30, tzinfo=UTC))
        cancelled = book(datetime(2030, 3, 4, 15, tzinfo=UTC))
        appointments.cancel(id=cancelled)

        day = appointments.provider_day(provider_id=tenant.provider_id, day=date(2030, 3, 4))
        assert [a.id for a in day] == [morning, late]
        with_cancelled = appointments.provider_day(
            provider_id=tenant.provider_id, day=date(2030, 3, 4), include_cancelled=True
        )
        assert [a.id for a in with_cancelled] == [morning, cancelled, late]
        previous = appointments.provider_day(provider_id=tenant.provider_id, day=date(2030, 3, 3))
        assert [a.id for a in previous] == [evening_before]
        following = appointments.provider_day(provider_id=tenant.provider_id, day=date(2030, 3, 5))
        assert [a.id for a in following] == [next_day]


# --- encounters, prescriptions, timeline --------------------------------------------------


def test_encounters_are_final_once_signed(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        encounters = EncounterRepository(db)
        patient = new_patient(db)
        visit = encounters.record(patient_id=patient.id, provider_id=tenant.provider_id,
                                  occurred_at=NINE, note="Stable.",
                                  diagnosis_codes=["I10", "E11.9"])
        assert visit.diagnosis_codes == ["I10", "E11.9"] and visit.signed_at is None
        assert encounters.amend_note(id=visit.id, note="Stable, BP 130/85.") == 1
        signed_at = encounters.sign(id=visit.id)
        assert isinstance(signed_at, datetime)
        assert encounters.sign(id=visit.id) is None
        assert encounters.amend_note(id=visit.id, note="Changed after signing") == 0
        final = encounters.get(id=visit.id)
        assert final is not None and final.note == "Stable, BP 130/85."
        assert final.signed_at == signed_at
        assert [e.id for e in encounters.for_patient(patient_id=patient.id)] == [visit.id]


def test_prescription_refills(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        prescriptions = PrescriptionRepository(db)
        patient = new_patient(db)
        rx = prescriptions.prescribe(patient_id=patient.id, prescriber_id=tenant.provider_id,
                                     drug_name="Amoxicillin", dosage="500 mg", frequency="tid",
                                     quantity=21, refills=2)
        assert rx.status == "active"
        assert prescriptions.use_refill(id=rx.id) == 1
        assert prescriptions.use_refill(id=rx.id) == 0
        assert prescriptions.use_refill(id=rx.id) is None
        other = prescriptions.prescribe(patient_id=patient.id, prescriber_id=tenant.provider_id,
                                        drug_name="Ibuprofen", dosage="200 mg", frequency="prn",
                                        quantity=10)
        assert prescriptions.set_status(id=other.id, status="cancelled") == 1
        active = prescriptions.for_patient(patient_id=patient.id, active_only=True)
        assert [p.id for p in active] == [rx.id]
        assert len(prescriptions.for_patient(patient_id=patient.id)) == 2
        got = prescriptions.get(id=rx.id)
        assert got is not None and got.refills == 0


def test_patient_timeline_merges_newest_first(db: Database, tenant: Tenant) -> None:
    with tenant.scope(db):
        # Prescriptions are dated now(): the visit is in the past.
        patient = new_patient(db)
        appointment = AppointmentRepository(db).book(
            patient_id=patient.id, provider_id=tenant.provider_id, starts_at=PAST,
            ends_at=PAST + timedelta(minutes=30), reason="Cough")
        encounter = EncounterRepository(db).record(
            patient_id=patient.id, provider_id=tenant.provider_id, appointment_id=appointment.id,
            occurred_at=PAST + timedelta(minutes=5), note="Viral.", diagnosis_codes=["J06.9"])
        rx = PrescriptionRepository(db).prescribe(
            patient_id=patient.id, prescriber_id=tenant.provider_id, encounter_id=encounter.id,
            drug_name="Honey", dosage="1 tsp", frequency="qid", quantity=1)
        other = new_patient(db)
        AppointmentRepository(db).book(patient_id=other.id, provider_id=tenant.provider_id,
                                       starts_at=PAST + timedelta(hours=1),
                                       ends_at=PAST + timedelta(hours=2))

        patients = PatientRepository(db)
        timeline = patients.timeline(patient_id=patient.id)
        assert [(e.kind, e.id) for e in timeline] == [
            ("prescription", rx.id), ("encounter", encounter.id), ("appointment", appointment.id)]
        assert timeline[1].summary == "J06.9" and timeline[1].status == "unsigned"
        assert timeline[2].summary == "Cough" and timeline[2].status == "scheduled"
        first = patients.timeline(patient_id=patient.id, limit=1)
        rest = patients.timeline(patient_id=patient.id, before_occurred_at=first[0].occurred_at,
                                 before_id=first[0].id)
        assert first + rest == timeline


# --- the cache declarations, end to end with Redis ------------------------------------------


def test_cached_reads_are_invalidated_by_the_writes_that_change_them(
    migrated_db: ServerDatabase, redis_server: RedisServer, tenant: Tenant
) -> None:
    settings = Settings(
        database_url=migrated_db.app_url, redis_url=redis_server.url, pool_min=1, pool_max=2,
        cache_key_prefix=f"hc-{uuid.uuid4().hex[:6]}",
        cache_encryption_key=base64.b64encode(os.urandom(32)).decode(),
    )
    with Database(settings) as cached_db:
        patients = PatientRepository(cached_db)
        appointments = AppointmentRepository(cached_db)
        providers = ProviderRepository(cached_db)
        with tenant.scope(cached_db):
            patient = new_patient(cached_db, phone="+1 555 0100")
            appointment = appointments.book(
                patient_id=patient.id, provider_id=tenant.provider_id, starts_at=NINE,
                ends_at=NINE + timedelta(minutes=30))
        # The next requests, which wrote nothing themselves (a writer's own block skips the
        # entries filled before its write).
        with tenant.scope(cached_db):
            assert patients.get(id=patient.id) == patient
            assert appointments.get(id=appointment.id) == appointment
            provider = providers.get(id=tenant.provider_id)
            assert provider is not None and not provider.on_call
        # Changed behind hcrepo's back: the cached values are still served ...
        with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
            conn.execute("UPDATE patients SET address = 'behind' WHERE id = %s", [patient.id])
            conn.execute("UPDATE appointments SET reason = 'behind' WHERE id = %s",
                         [appointment.id])
            conn.execute("UPDATE providers SET specialty = 'behind' WHERE id = %s",
                         [tenant.provider_id])
        with tenant.scope(cached_db):
            assert patients.get(id=patient.id) == patient
            assert appointments.get(id=appointment.id) == appointment
            assert providers.get(id=tenant.provider_id) == provider
        # ... until a repository write declares the same tag: then every request misses.
        with tenant.scope(cached_db):
            patients.update_contact(id=patient.id, phone="+1 555 0199", email=None,
                                    address="1 Main St")
            appointments.cancel(id=appointment.id)
            providers.set_on_call(id=tenant.provider_id, on_call=True)
        with tenant.scope(cached_db):
            fresh_patient = patients.get(id=patient.id)
            assert fresh_patient is not None and fresh_patient.phone == "+1 555 0199"
            fresh_appointment = appointments.get(id=appointment.id)
            assert fresh_appointment is not None and fresh_appointment.status == "cancelled"
            assert fresh_appointment.reason == "behind"
            fresh_provider = providers.get(id=tenant.provider_id)
            assert fresh_provider is not None and fresh_provider.on_call
            assert fresh_provider.specialty == "behind"
