"""`hcrepo demo`: tenant isolation on a throw-away PostgreSQL, start to finish.

It starts an embedded server, bootstraps the owner role and database, applies the
migrations, then works only as the application role `hcrepo_app`: it seeds two clinics, each
inside its own clinic context, and shows what each clinic and no clinic at all can see.
Everything is removed on exit, on error too. Output names clinics and MRNs, never PHI.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Sequence
from typing import TextIO
from uuid import UUID

import psycopg

from hcrepo import migrate
from hcrepo.embedded import PostgresServer

# Obviously fake people: (MRN, first name, last name, date of birth, sex).
CLINICS: dict[str, Sequence[tuple[str, str, str, str, str]]] = {
    "Demo Clinic North": [
        ("N-0001", "Testy", "McTestface", "1980-01-01", "other"),
        ("N-0002", "Jane", "Placeholder", "1975-06-15", "female"),
        ("N-0003", "John", "Sampleton", "1990-12-31", "male"),
    ],
    "Demo Clinic South": [
        ("S-0001", "Fake", "Person", "2001-02-03", "unknown"),
        ("S-0002", "Dummy", "Patient", "1969-07-20", "female"),
    ],
}


def run(out: TextIO = sys.stdout) -> int:
    with PostgresServer() as server:
        out.write(f"throw-away PostgreSQL on {server.host}:{server.port}\n")
        owner_url = migrate.bootstrap(
            server.superuser_url, database="hcrepo_demo", owner_password=secrets.token_urlsafe()
        )
        applied = migrate.apply(owner_url, setting="demo owner URL")
        out.write(f"migrations applied as {migrate.OWNER_ROLE}: {', '.join(applied)}\n")

        app_password = secrets.token_urlsafe()
        migrate.set_role_password(owner_url, migrate.APP_ROLE, app_password)
        app_url = migrate.conninfo_url(owner_url, user=migrate.APP_ROLE, password=app_password)
        with psycopg.connect(app_url) as conn:
            clinic_ids = {name: _seed(conn, name, patients) for name, patients in CLINICS.items()}
            out.write(f"connected as {migrate.APP_ROLE}; seeded {len(clinic_ids)} clinics\n\n")
            for name, clinic_id in clinic_ids.items():
                mrns = _visible_mrns(conn, clinic_id)
                out.write(f"{name} sees {len(mrns)} patients: {', '.join(mrns)}\n")
            out.write(f"no clinic context sees {len(_visible_mrns(conn, None))} patients\n")
            north, south = clinic_ids.values()
            out.write(f"North writing a patient into South: {_cross_write(conn, north, south)}\n")
    out.write("\nserver stopped and removed\n")
    return 0


def _in_clinic(conn: psycopg.Connection, clinic_id: UUID | None) -> None:
    # Transaction-local (is_local = true): the clinic ends with the transaction.
    value = "" if clinic_id is None else str(clinic_id)
    conn.execute("SELECT set_config('app.clinic_id', %s, true)", [value])


def _seed(
    conn: psycopg.Connection, name: str, patients: Sequence[tuple[str, str, str, str, str]]
) -> UUID:
    with conn.transaction():
        row = conn.execute("INSERT INTO clinics (name) VALUES (%s) RETURNING id", [name]).fetchone()
        assert row is not None  # INSERT ... RETURNING of one row
        clinic_id: UUID = row[0]
        _in_clinic(conn, clinic_id)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [(clinic_id, *patient) for patient in patients],
            )
    return clinic_id


def _visible_mrns(conn: psycopg.Connection, clinic_id: UUID | None) -> list[str]:
    with conn.transaction():
        _in_clinic(conn, clinic_id)
        rows = conn.execute("SELECT mrn FROM patients ORDER BY mrn").fetchall()
    return [mrn for (mrn,) in rows]


def _cross_write(conn: psycopg.Connection, acting: UUID, other: UUID) -> str:
    try:
        with conn.transaction():
            _in_clinic(conn, acting)
            conn.execute(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
                " VALUES (%s, 'X-0001', 'Not', 'Allowed', '2000-01-01', 'unknown')",
                [other],
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        return f"refused by row-level security ({exc.sqlstate})"
    return "ALLOWED (tenant isolation is broken)"
