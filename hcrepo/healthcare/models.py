"""Row models of the healthcare schema, one per result shape the repositories return.

Field names are the column names of the queries in sql/*.sql and the types are the ones the
driver produces for them; `hcrepo check` compares both with the live schema. Models are
frozen: a row read once may be shared (cached) by many callers.

Fields marked `PHI()` are masked in the models' repr and str, in `hcrepo.mask` and in log
records. Marked: what identifies a patient (names, date of birth, SSN, contact details,
MRN) and what is written about their health (notes, reasons, diagnosis codes, drug and
dosage, the timeline's summary of those). Staff e-mails and names are not patients' PHI, but
are personal data no log needs: marked too. Not marked: ids, clinic and provider directory
data (public: names, specialties, NPIs), sex, statuses, counts, and the times of events,
which a reader needs to follow a log and which identify no one without the masked fields.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import ConfigDict

from hcrepo.phi.fields import PHI
from hcrepo.phi.patients import PatientId
from hcrepo.phi.phi_model import PhiModel

StaffRole = Literal["doctor", "nurse", "admin", "receptionist"]
Sex = Literal["female", "male", "other", "unknown"]
AppointmentStatus = Literal["scheduled", "checked_in", "completed", "cancelled", "no_show"]
PrescriptionStatus = Literal["active", "completed", "cancelled"]
TimelineKind = Literal["appointment", "encounter", "prescription"]


class Row(PhiModel):
    model_config = ConfigDict(frozen=True)


class Clinic(Row):
    id: UUID
    name: str
    timezone: str
    created_at: datetime


class User(Row):
    id: UUID
    email: Annotated[str, PHI()]
    full_name: Annotated[str, PHI()]
    role: StaffRole
    active: bool
    created_at: datetime


class StaffMember(Row):
    """A user as a member of the current clinic (clinic_memberships joined with users)."""

    user_id: UUID
    email: Annotated[str, PHI()]
    full_name: Annotated[str, PHI()]
    role: StaffRole
    active: bool


class Patient(Row):
    id: Annotated[UUID, PatientId()]
    clinic_id: UUID
    mrn: Annotated[str, PHI()]
    first_name: Annotated[str, PHI()]
    last_name: Annotated[str, PHI()]
    date_of_birth: Annotated[date, PHI()]
    sex: Sex
    phone: Annotated[str | None, PHI()]
    email: Annotated[str | None, PHI()]
    address: Annotated[str | None, PHI()]
    ssn: Annotated[str | None, PHI()]
    created_at: datetime
    updated_at: datetime


class PatientSummary(Row):
    """What a search result list shows: no contact details, no SSN."""

    id: Annotated[UUID, PatientId()]
    mrn: Annotated[str, PHI()]
    first_name: Annotated[str, PHI()]
    last_name: Annotated[str, PHI()]
    date_of_birth: Annotated[date, PHI()]
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
    reason: Annotated[str | None, PHI()]
    created_at: datetime
    updated_at: datetime


class Encounter(Row):
    id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    appointment_id: UUID | None
    occurred_at: datetime
    note: Annotated[str, PHI()]
    diagnosis_codes: Annotated[list[str], PHI()]
    signed_at: datetime | None
    created_at: datetime


class Prescription(Row):
    id: UUID
    clinic_id: UUID
    patient_id: UUID
    prescriber_id: UUID
    encounter_id: UUID | None
    drug_name: Annotated[str, PHI()]
    dosage: Annotated[str, PHI()]
    frequency: str
    quantity: int
    refills: int
    status: PrescriptionStatus
    prescribed_at: datetime
    notes: Annotated[str | None, PHI()]
    created_at: datetime


class TimelineEntry(Row):
    """One event of a patient's history: an appointment, an encounter or a prescription."""

    kind: TimelineKind
    id: UUID
    occurred_at: datetime
    provider_id: UUID
    status: str | None
    summary: Annotated[str | None, PHI()]
