"""The healthcare repositories: one class per aggregate over the shipped sql/<aggregate>.sql.

Every repository but clinics is tenant-scoped: a call needs `db.context(clinic_id=...)` and
sees only that clinic's rows (row-level security), staff accounts included (through their
memberships). Clinics are a directory shared by all clinics. Methods marked `phi=True` read
or write protected health information.

The method bodies never run (the class replaces each with a call to its query), hence the
file-level mypy setting below: `...` is the declaration, not a missing return.
"""
# mypy: disable-error-code="empty-body"

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Literal
from uuid import UUID

from hcrepo.healthcare.models import (
    Appointment,
    AppointmentStatus,
    Clinic,
    Encounter,
    Patient,
    PatientSummary,
    Prescription,
    PrescriptionStatus,
    Provider,
    Sex,
    StaffMember,
    StaffRole,
    TimelineEntry,
    User,
)
from hcrepo.repository import Repository, cached, query
from hcrepo.shipped import shipped_dir

SQL = shipped_dir("sql")

PatientSort = Literal[
    "last_name", "-last_name", "first_name", "-first_name", "date_of_birth", "-date_of_birth",
    "mrn", "-mrn", "created_at", "-created_at",
]


class ClinicRepository(Repository, sql=str(SQL / "clinics.sql"), tenant=False):
    @query("get_clinic")
    @cached(ttl="clinic", tags=["clinic:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> Clinic | None: ...

    @query("list_clinics")
    def directory(
        self, *, after_name: str | None = None, after_id: UUID | None = None, limit: int = 100
    ) -> list[Clinic]: ...

    @query("create_clinic")
    def create(self, *, name: str, timezone: str = "UTC") -> Clinic: ...

    @query("update_clinic", invalidates=["clinic:{id}"])
    def update(self, *, id: UUID, name: str, timezone: str) -> int:
        """Only the clinic in context can change its own row; any other id changes nothing."""
        ...


class UserRepository(Repository, sql=str(SQL / "users.sql")):
    """Staff accounts, visible and changeable only through a membership in the current clinic."""

    @query("get_user")
    @cached(ttl="clinic", tags=["user:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> User | None: ...

    @query("get_user_by_email")
    def by_email(self, *, email: str) -> User | None: ...

    @query("onboard_staff")
    def onboard(self, *, email: str, full_name: str, role: StaffRole) -> User:
        """A new account and its membership in the current clinic, in one statement.

        `UniqueViolation` when the e-mail exists (in any clinic): an existing account is never
        attached, so a clinic cannot take over another clinic's staff. An existing user joins
        this clinic with `StaffRepository.add(user_id=...)`.
        """
        ...

    @query("set_user_active", invalidates=["user:{id}"])
    def set_active(self, *, id: UUID, active: bool) -> int: ...


class StaffRepository(Repository, sql=str(SQL / "users.sql")):
    """The current clinic's staff: memberships of user accounts (the id is the capability:
    a clinic adds an existing user it was given the id of; it cannot list other clinics')."""

    @query("list_members")
    def members(self, *, limit: int = 100) -> list[StaffMember]: ...

    @query("add_member")
    def add(self, *, user_id: UUID, role: StaffRole) -> int: ...

    @query("remove_member")
    def remove(self, *, user_id: UUID) -> int: ...


class PatientRepository(Repository, sql=str(SQL / "patients.sql")):
    @query("get_patient", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> Patient | None: ...

    @query("get_patient_by_mrn", phi=True)
    def by_mrn(self, *, mrn: str) -> Patient | None: ...

    @query("get_patient_by_ssn", phi=True)
    def by_ssn(self, *, ssn: str) -> Patient | None:
        """The patient with this SSN, in any spelling ("123-45-6789", "123 45 6789",
        "123456789"), found through its blind index; `ssn` is None for staff who may not see
        SSNs. TypeError when `ssn` is not digits, spaces and dashes."""
        ...

    @query("search_patients", phi=True)
    def search(
        self,
        *,
        name: str | None = None,
        date_of_birth: date | None = None,
        mrn: str | None = None,
        sort: PatientSort = "last_name",
        limit: int = 50,
    ) -> list[PatientSummary]: ...

    @query("page_patients", phi=True)
    def page(
        self,
        *,
        after_last_name: str | None = None,
        after_id: UUID | None = None,
        name: str | None = None,
        date_of_birth: date | None = None,
        limit: int = 50,
    ) -> list[PatientSummary]: ...

    @query("count_patients")
    def count(self) -> int: ...

    @query("stream_patients", phi=True)
    def stream_all(self) -> Iterator[Patient]: ...

    @query("create_patient", phi=True)
    def create(
        self,
        *,
        mrn: str,
        first_name: str,
        last_name: str,
        date_of_birth: date,
        sex: Sex,
        phone: str | None = None,
        email: str | None = None,
        address: str | None = None,
        ssn: str | None = None,
    ) -> Patient: ...

    @query("update_patient_contact", phi=True, invalidates=["patient:{id}"],
           patient_id_param="id")
    def update_contact(
        self, *, id: UUID, phone: str | None, email: str | None, address: str | None
    ) -> int: ...

    @query("set_patient_ssn", phi=True, invalidates=["patient:{id}"],
           patient_id_param="id")
    def set_ssn(self, *, id: UUID, ssn: str | None) -> int:
        """Store (encrypted, with its blind index) or clear the SSN; UniqueViolation when
        another patient of the clinic has it."""
        ...

    @query("update_patient_name", phi=True, invalidates=["patient:{id}"],
           patient_id_param="id")
    def rename(self, *, id: UUID, first_name: str, last_name: str) -> int: ...

    @query("patient_timeline", phi=True)
    def timeline(
        self,
        *,
        patient_id: UUID,
        before_occurred_at: datetime | None = None,
        before_id: UUID | None = None,
        limit: int = 50,
    ) -> list[TimelineEntry]: ...


class ProviderRepository(Repository, sql=str(SQL / "providers.sql")):
    @query("get_provider")
    @cached(ttl="clinic", tags=["provider:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> Provider | None: ...

    @query("list_providers")
    def find(
        self, *, active: bool | None = True, specialty: str | None = None, limit: int = 100
    ) -> list[Provider]: ...

    @query("on_call_providers")
    def on_call(self, *, limit: int = 100) -> list[Provider]: ...

    @query("create_provider")
    def create(
        self,
        *,
        display_name: str,
        user_id: UUID | None = None,
        specialty: str | None = None,
        npi: str | None = None,
    ) -> Provider: ...

    @query("set_provider_on_call", invalidates=["provider:{id}"])
    def set_on_call(self, *, id: UUID, on_call: bool) -> int: ...

    @query("deactivate_provider", invalidates=["provider:{id}"])
    def deactivate(self, *, id: UUID) -> int: ...


class AppointmentRepository(Repository, sql=str(SQL / "appointments.sql")):
    @query("get_appointment", phi=True)
    @cached(ttl="appointment", tags=["appointment:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> Appointment | None: ...

    @query("provider_day", phi=True)
    def provider_day(
        self, *, provider_id: UUID, day: date, include_cancelled: bool = False, limit: int = 200
    ) -> list[Appointment]: ...

    @query("patient_appointments", phi=True)
    def for_patient(
        self, *, patient_id: UUID, since: datetime, limit: int = 50
    ) -> list[Appointment]: ...

    @query("book_appointment", phi=True)
    def book(
        self,
        *,
        patient_id: UUID,
        provider_id: UUID,
        starts_at: datetime,
        ends_at: datetime,
        reason: str | None = None,
    ) -> Appointment:
        """Raises ExclusionViolation when the provider is already booked for that time."""
        ...

    @query("cancel_appointment", phi=True, invalidates=["appointment:{id}"])
    def cancel(self, *, id: UUID) -> int: ...

    @query("reschedule_appointment", phi=True, invalidates=["appointment:{id}"])
    def reschedule(
        self, *, id: UUID, starts_at: datetime, ends_at: datetime
    ) -> Appointment | None:
        """None when no scheduled appointment has that id; ExclusionViolation when taken."""
        ...

    @query("set_appointment_status", phi=True, invalidates=["appointment:{id}"])
    def set_status(self, *, id: UUID, status: AppointmentStatus) -> int: ...


class EncounterRepository(Repository, sql=str(SQL / "encounters.sql")):
    # Keyed by the actor: a draft note is visible to its author only (migrations/0007).
    @query("get_encounter", phi=True)
    @cached(ttl="patient", tags=["encounter:{id}"])
    def get(self, *, id: UUID) -> Encounter | None: ...

    @query("patient_encounters", phi=True)
    def for_patient(self, *, patient_id: UUID, limit: int = 50) -> list[Encounter]: ...

    @query("record_encounter", phi=True)
    def record(
        self,
        *,
        patient_id: UUID,
        provider_id: UUID,
        occurred_at: datetime,
        note: str,
        diagnosis_codes: list[str],
        appointment_id: UUID | None = None,
    ) -> Encounter: ...

    @query("amend_encounter_note", phi=True, invalidates=["encounter:{id}"])
    def amend_note(self, *, id: UUID, note: str) -> int:
        """0 when the encounter is already signed (or unknown)."""
        ...

    @query("sign_encounter", phi=True, invalidates=["encounter:{id}"])
    def sign(self, *, id: UUID) -> datetime | None:
        """The signature time; None when already signed (or unknown)."""
        ...


class PrescriptionRepository(Repository, sql=str(SQL / "prescriptions.sql")):
    @query("get_prescription", phi=True)
    @cached(ttl="patient", tags=["prescription:{id}"], independent_of=("actor_id",))
    def get(self, *, id: UUID) -> Prescription | None: ...

    @query("patient_prescriptions", phi=True)
    def for_patient(
        self, *, patient_id: UUID, active_only: bool = False, limit: int = 50
    ) -> list[Prescription]: ...

    @query("prescribe", phi=True)
    def prescribe(
        self,
        *,
        patient_id: UUID,
        prescriber_id: UUID,
        drug_name: str,
        dosage: str,
        frequency: str,
        quantity: int,
        refills: int = 0,
        encounter_id: UUID | None = None,
        notes: str | None = None,
    ) -> Prescription: ...

    @query("use_refill", phi=True, invalidates=["prescription:{id}"])
    def use_refill(self, *, id: UUID) -> int | None:
        """Refills left after this one; None when none was left or it is not active."""
        ...

    @query("set_prescription_status", phi=True, invalidates=["prescription:{id}"])
    def set_status(self, *, id: UUID, status: PrescriptionStatus) -> int: ...
