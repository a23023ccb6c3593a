"""Row models of the healthcare schema, one per result shape the repositories return.

Field names are the column names of the queries in sql/*.sql and the types are the ones the
driver produces for them; `hcrepo check` compares both with the live schema. Models are
frozen: a row read once may be shared (cached) by many callers.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from hcrepo.compliance.fields import Encrypted

StaffRole = Literal["doctor", "nurse", "admin", "receptionist"]
Sex = Literal["female", "male", "other", "unknown"]
AppointmentStatus = Literal["scheduled", "checked_in", "completed", "cancelled", "no_show"]
PrescriptionStatus = Literal["active", "completed", "cancelled"]
TimelineKind = Literal["appointment", "encounter", "prescription"]


class Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class Clinic(Row):
    id: UUID
    name: str
    timezone: str
    created_at: datetime


class User(Row):
    id: UUID
    email: str
    full_name: str
    role: StaffRole
    active: bool
    created_at: datetime


class StaffMember(Row):
    """A user as a member of the current clinic (clinic_memberships joined with users)."""

    user_id: UUID
    email: str
    full_name: str
    role: StaffRole
    active: bool


class Patient(Row):
    id: UUID
    clinic_id: UUID
    mrn: str
    first_name: str
    last_name: str
    date_of_birth: date
    sex: Sex
    phone: str | None
    email: str | None
    address: str | None
    # Stored as ciphertext (sql/patients.sql: `-- encrypt: patients.ssn`); None for staff
    # who may not see it.
    ssn: Annotated[str | None, Encrypted()]
    created_at: datetime
    updated_at: datetime


class PatientSummary(Row):
    """What a search result list shows: no contact details, no SSN."""

    id: UUID
    mrn: str
    first_name: str
    last_name: str
    date_of_birth: date
    sex: Sex


class Provider(Row):
    id: UUID
    clinic_id: UUID
    user_id: UUID | None
    display_name: str
    specialty: str | None
    npi: str | None
    active: bool
    on_call: bool
    created_at: datetime


class Appointment(Row):
    id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: datetime
    ends_at: datetime
    status: AppointmentStatus
    reason: str | None
    created_at: datetime
    updated_at: datetime


class Encounter(Row):
    id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    appointment_id: UUID | None
    occurred_at: datetime
    note: str
    diagnosis_codes: list[str]
    signed_at: datetime | None
    created_at: datetime


class Prescription(Row):
    id: UUID
    clinic_id: UUID
    patient_id: UUID
    prescriber_id: UUID
    encounter_id: UUID | None
    drug_name: str
    dosage: str
    frequency: str
    quantity: int
    refills: int
    status: PrescriptionStatus
    prescribed_at: datetime
    notes: str | None
    created_at: datetime


class TimelineEntry(Row):
    """One event of a patient's history: an appointment, an encounter or a prescription."""

    kind: TimelineKind
    id: UUID
    occurred_at: datetime
    provider_id: UUID
    status: str | None
    summary: str | None
