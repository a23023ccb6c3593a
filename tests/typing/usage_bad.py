# ruff: noqa: E501  (the expected messages are long)
"""Misuse that mypy --strict must reject (tests/test_typing.py).

Each line marked `# E: <text>` must produce an error containing <text> on that line, and
no other line may produce one. Never run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from hcrepo import Database
from hcrepo.healthcare import AppointmentRepository, PatientRepository


def misuse(db: Database, patient_id: UUID) -> None:
    patients = PatientRepository(db)
    print(patients.get(id=patient_id).last_name)  # E: Item "None" of "Patient | None" has no attribute "last_name"
    patients.get(patient_id)  # E: Too many positional arguments for "get" of "PatientRepository"
    patients.get(id=str(patient_id))  # E: Argument "id" to "get" of "PatientRepository" has incompatible type "str"; expected "UUID"
    patients.get(id=patient_id, mrn="A-1")  # E: Unexpected keyword argument "mrn" for "get" of "PatientRepository"
    patients.search(sort="ssn")  # E: Argument "sort" to "search" of "PatientRepository" has incompatible type "Literal['ssn']"
    total: str = patients.count()  # E: Incompatible types in assignment (expression has type "int", variable has type "str")
    for summary in patients.search(name="smi"):
        print(summary.ssn)  # E: "PatientSummary" has no attribute "ssn"
    print(len(patients.stream_all()))  # E: Argument 1 to "len" has incompatible type "Iterator[Patient]"; expected "Sized"
    start = datetime(2030, 1, 1, tzinfo=UTC)
    AppointmentRepository(db).book(patient_id=patient_id, starts_at=start, ends_at=start)  # E: Missing named argument "provider_id" for "book" of "AppointmentRepository"
    AppointmentRepository(db).set_status(id=patient_id, status="done")  # E: Argument "status" to "set_status" of "AppointmentRepository" has incompatible type "Literal['done']"
    print(total)
