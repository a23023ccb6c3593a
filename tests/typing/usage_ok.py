"""Types flow from repository declarations to callers (checked by tests/test_typing.py).

Never run: mypy --strict must accept every line, and each assert_type must hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import assert_type
from uuid import UUID, uuid4

from hcrepo import Database, UnitOfWork
from hcrepo.healthcare import (
    Appointment,
    AppointmentRepository,
    AppointmentStatus,
    EncounterRepository,
    Patient,
    PatientRepository,
    PatientSummary,
    PrescriptionRepository,
    TimelineEntry,
)


def read(db: Database, patient_id: UUID) -> str | None:
    patients = PatientRepository(db)
    patient = patients.get(id=patient_id)
    assert_type(patient, Patient | None)
    if patient is None:
        return None
    assert_type(patient.date_of_birth, date)
    assert_type(patient.phone, str | None)
    assert_type(patients.search(name="smi", sort="-date_of_birth", limit=20),
                list[PatientSummary])
    assert_type(patients.count(), int)
    assert_type(patients.stream_all(), Iterator[Patient])
    assert_type(patients.timeline(patient_id=patient_id), list[TimelineEntry])
    return patient.last_name


def write(uow: UnitOfWork, *, patient_id: UUID, provider_id: UUID) -> datetime | None:
    start = datetime(2030, 1, 1, 9, tzinfo=UTC)
    booked = AppointmentRepository(uow).book(
        patient_id=patient_id, provider_id=provider_id, starts_at=start, ends_at=start
    )
    assert_type(booked, Appointment)
    assert_type(booked.status, AppointmentStatus)
    assert_type(AppointmentRepository(uow).cancel(id=booked.id), int)
    assert_type(PrescriptionRepository(uow).use_refill(id=uuid4()), int | None)
    return EncounterRepository(uow).sign(id=uuid4())


def transaction(db: Database, patient_id: UUID, provider_id: UUID) -> None:
    signed = db.transaction(write, patient_id=patient_id, provider_id=provider_id, retries=5)
    assert_type(signed, datetime | None)
