"""Small test repositories over tests/sql/ and clinics made for one test.

The seeded clinics are read-only for every test; tests that change rows build their own
clinic with `new_clinic` (as the superuser, so RLS does not get in the way of the setup).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from pydantic import BaseModel

from hcrepo import Database, Repository, query


class PatientRow(BaseModel):
    id: UUID
    clinic_id: UUID
    mrn: str
    phone: str | None


class Probe(BaseModel):
    """The session as the server sees it inside the transaction of the probe query."""

    clinic: str | None
    actor: str | None
    role: str
    row_security: str
    isolation: str
    read_only: str
    statement_timeout: str
    pid: int


class Clinical(Repository, sql="../sql/clinical.sql"):
    @query("count_bookings")
    def count_bookings(self, *, provider_id: UUID, starts_at: datetime) -> int: ...

    @query("on_call_count")
    def on_call_count(self) -> int: ...

    @query("go_off_call")
    def go_off_call(self, *, id: UUID) -> int: ...

    @query("is_on_call")
    def is_on_call(self, *, id: UUID) -> bool: ...

    @query("patients", phi=True)
    def patients(self) -> list[PatientRow]: ...

    @query("stream_patients", phi=True)
    def stream_patients(self) -> Iterator[PatientRow]: ...

    @query("patient", phi=True)
    def patient(self, *, id: UUID) -> PatientRow | None: ...

    @query("set_phone", phi=True)
    def set_phone(self, *, id: UUID, phone: str) -> int: ...

    @query("add_patient", phi=True)
    def add_patient(self, *, clinic_id: UUID, mrn: str) -> UUID: ...

    @query("count_mrn")
    def count_mrn(self, *, mrn: str) -> int: ...


class AuditWrites(Repository, sql="../sql/audit.sql"):
    @query("bulk_patients", phi=True)
    def bulk_patients(self, *, prefix: str, count: int) -> int: ...

    @query("audit_trigger_calls")
    def audit_trigger_calls(self) -> int: ...


class Session(Repository, sql="../sql/session.sql", tenant=False):
    @query("probe")
    def probe(self) -> Probe: ...

    @query("probe_with_timeout")
    def probe_with_timeout(self) -> Probe: ...

    @query("clinic_ids")
    def clinic_ids(self) -> list[UUID]: ...

    @query("add_mark")
    def add_mark(self, *, mark: str) -> int: ...

    @query("count_marks")
    def count_marks(self, *, mark: str) -> int: ...


@dataclass(frozen=True)
class Clinic:
    """A clinic made for one test: its actor (a member user), providers and patients."""

    id: UUID
    actor_id: UUID
    provider_ids: tuple[UUID, ...]
    patient_ids: tuple[UUID, ...]


def new_clinic(
    superuser_url: str, *, providers: int = 1, patients: int = 1, on_call: bool = False
) -> Clinic:
    tag = uuid.uuid4().hex[:10]
    with psycopg.connect(superuser_url) as conn:

        def insert(sql: str, *params: Any) -> UUID:
            row = conn.execute(sql + " RETURNING id", params).fetchone()
            assert row is not None
            return UUID(str(row[0]))

        clinic = insert("INSERT INTO clinics (name) VALUES (%s)", f"Test clinic {tag}")
        actor = insert(
            "INSERT INTO users (email, full_name, role) VALUES (%s, 'Test Doctor', 'doctor')",
            f"doctor-{tag}@example.invalid",
        )
        conn.execute(
            "INSERT INTO clinic_memberships (clinic_id, user_id, role) VALUES (%s, %s, 'doctor')",
            (clinic, actor),
        )
        provider_ids = tuple(
            insert(
                "INSERT INTO providers (clinic_id, user_id, display_name, on_call)"
                " VALUES (%s, %s, %s, %s)",
                clinic, actor, f"Dr {tag} {n}", on_call,
            )
            for n in range(providers)
        )
        patient_ids = tuple(
            insert(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
                " VALUES (%s, %s, 'Test', 'Patient', DATE '1990-01-01', 'unknown')",
                clinic, f"{tag}-{n}",
            )
            for n in range(patients)
        )
    return Clinic(clinic, actor, provider_ids, patient_ids)


def staff_member(superuser_url: str, clinic_id: UUID, role: str) -> UUID:
    """A new user holding `role` in the clinic (staff roles: migrations/0007)."""
    tag = uuid.uuid4().hex[:10]
    with psycopg.connect(superuser_url) as conn:
        row = conn.execute(
            "INSERT INTO users (email, full_name, role) VALUES (%s, 'Test Staff', %s)"
            " RETURNING id", (f"{role}-{tag}@example.invalid", role)).fetchone()
        assert row is not None
        conn.execute("INSERT INTO clinic_memberships (clinic_id, user_id, role)"
                     " VALUES (%s, %s, %s)", (clinic_id, row[0], role))
    return UUID(str(row[0]))


MakeDatabase = Callable[..., Database]
