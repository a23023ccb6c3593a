"""A clinic with one member in each staff role and a row in every tenant table, written by
the superuser, for the role matrix and break-glass tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

ROLES = ("doctor", "nurse", "admin", "receptionist")


@dataclass(frozen=True)
class StaffClinic:
    id: UUID
    members: dict[str, UUID]  # staff role -> the user holding it here
    outsider: UUID  # a user with no membership in this clinic (a doctor elsewhere)
    provider_id: UUID  # the doctor's provider record
    patient_id: UUID
    appointment_id: UUID
    signed_encounter_id: UUID
    draft_encounter_id: UUID  # unsigned, written by the doctor
    prescription_id: UUID


def staff_clinic(superuser_url: str) -> StaffClinic:
    tag = uuid.uuid4().hex[:10]
    with psycopg.connect(superuser_url) as conn:

        def insert(sql: str, *params: Any) -> UUID:
            row = conn.execute(sql + " RETURNING id", params).fetchone()
            assert row is not None
            return UUID(str(row[0]))

        def user(role: str) -> UUID:
            email = f"{role}-{uuid.uuid4().hex[:10]}-{tag}@example.invalid"
            return insert("INSERT INTO users (email, full_name, role) VALUES (%s, %s, %s)",
                          email, f"Staff {role}", role)

        clinic = insert("INSERT INTO clinics (name) VALUES (%s)", f"Staff clinic {tag}")
        elsewhere = insert("INSERT INTO clinics (name) VALUES (%s)", f"Elsewhere {tag}")
        members = {role: user(role) for role in ROLES}
        for role, member in members.items():
            conn.execute("INSERT INTO clinic_memberships (clinic_id, user_id, role)"
                         " VALUES (%s, %s, %s)", (clinic, member, role))
        outsider = user("doctor")
        conn.execute("INSERT INTO clinic_memberships (clinic_id, user_id, role)"
                     " VALUES (%s, %s, 'doctor')", (elsewhere, outsider))
        provider = insert("INSERT INTO providers (clinic_id, user_id, display_name)"
                          " VALUES (%s, %s, 'Dr Staff')", clinic, members["doctor"])
        patient = insert(
            "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
            " VALUES (%s, %s, 'Test', 'Patient', DATE '1990-01-01', 'unknown')", clinic, tag)
        appointment = insert(
            "INSERT INTO appointments (clinic_id, patient_id, provider_id, starts_at, ends_at)"
            " VALUES (%s, %s, %s, '2031-01-06 09:00Z', '2031-01-06 09:30Z')",
            clinic, patient, provider)

        def encounter(signed: bool) -> UUID:
            return insert(
                "INSERT INTO encounters (clinic_id, patient_id, provider_id, occurred_at, note,"
                " signed_at) VALUES (%s, %s, %s, '2031-01-06 09:05Z', 'note', %s)",
                clinic, patient, provider, "2031-01-06 09:30Z" if signed else None)

        signed, draft = encounter(True), encounter(False)
        prescription = insert(
            "INSERT INTO prescriptions (clinic_id, patient_id, prescriber_id, drug_name, dosage,"
            " frequency, quantity) VALUES (%s, %s, %s, 'Placebo', '1', 'daily', 10)",
            clinic, patient, provider)
        # What the encryption tables hold for a clinic: a wrapped data key, a rotation, an
        # SSN sealed (a well-formed stand-in: no key is needed to see who may read it), and
        # a plaintext SSN the encryption migration set aside.
        conn.execute("INSERT INTO clinic_data_keys (clinic_id, version, master_version,"
                     " wrapped) VALUES (%s, 1, 1, '\\x00')", (clinic,))
        conn.execute("INSERT INTO key_rotations (clinic_id, kind, event, to_version)"
                     " VALUES (%s, 'data', 'started', 1)", (clinic,))
        conn.execute("UPDATE patients SET ssn = 'hc1:1:AAAA', ssn_bidx = %s WHERE id = %s",
                     (bytes(32), patient))
        conn.execute("INSERT INTO patients_plaintext_ssn (patient_id, clinic_id, ssn)"
                     " VALUES (%s, %s, '000-00-0000')", (patient, clinic))
    return StaffClinic(clinic, members, outsider, provider, patient, appointment, signed,
                       draft, prescription)
