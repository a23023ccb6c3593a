"""Databases on the session's throw-away primary: migrated, seeded, or fresh and empty.

`migrated_db` (session) is the schema every tenant-aware test runs against, reached as the
superuser, the owner (`hcrepo_owner`) or the application role (`hcrepo_app`). `seeded`
(session) puts three clinics in it. `fresh_database` makes empty bootstrapped databases
for tests that apply and roll back migrations themselves: the plugin's DatabaseJanitor
creates them and drops them afterwards.

Roles are cluster-wide, so every database here shares one owner and one app password.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from hcrepo.admin import migrate
from hcrepo.testing import PostgresServer
from hcrepo.testing.plugin import DatabaseFactory

OWNER_PASSWORD = "hcrepo-owner-test"
APP_PASSWORD = "hcrepo-app-test"
AUDITOR_PASSWORD = "hcrepo-auditor-test"
TEST_DBNAME = "hcrepo_test"


@dataclass(frozen=True)
class Database:
    """One bootstrapped database on `server` and URLs to reach it as each role."""

    server: PostgresServer
    dbname: str
    superuser_url: str
    owner_url: str
    app_url: str
    auditor_url: str

    def replica_app_url(self, replica: PostgresServer) -> str:
        """The application role's URL for this database on a replica of `server`."""
        return replica.url(user=migrate.APP_ROLE, password=APP_PASSWORD, dbname=self.dbname)

    def replica_superuser_url(self, replica: PostgresServer) -> str:
        return replica.url(
            user="postgres", password=replica.superuser_password, dbname=self.dbname
        )


def bootstrap_database(server: PostgresServer, dbname: str) -> Database:
    """Create `dbname` owned by hcrepo_owner (no migrations applied)."""
    owner_url = migrate.bootstrap(
        server.superuser_url, database=dbname, owner_password=OWNER_PASSWORD
    )
    return _database(server, dbname, owner_url)


def _database(server: PostgresServer, dbname: str, owner_url: str) -> Database:
    return Database(
        server=server,
        dbname=dbname,
        superuser_url=server.url(
            user="postgres", password=server.superuser_password, dbname=dbname
        ),
        owner_url=owner_url,
        app_url=server.url(user=migrate.APP_ROLE, password=APP_PASSWORD, dbname=dbname),
        auditor_url=server.url(
            user=migrate.AUDITOR_ROLE, password=AUDITOR_PASSWORD, dbname=dbname
        ),
    )


def migrate_database(db: Database) -> None:
    """Apply every migration as the owner and give hcrepo_app and hcrepo_auditor their test
    passwords."""
    migrate.apply(db.owner_url, setting="owner URL")
    migrate.set_role_password(db.owner_url, migrate.APP_ROLE, APP_PASSWORD)
    migrate.set_role_password(db.owner_url, migrate.AUDITOR_ROLE, AUDITOR_PASSWORD)


@pytest.fixture(scope="session")
def migrated_db(pg_primary: PostgresServer) -> Database:
    """`hcrepo_test` on pg_primary with every migration applied."""
    db = bootstrap_database(pg_primary, TEST_DBNAME)
    migrate_database(db)
    return db


FreshDatabase = Callable[[], Database]


@pytest.fixture
def fresh_database(hcrepo_database_factory: DatabaseFactory) -> FreshDatabase:
    """Factory of new, empty, bootstrapped databases; all dropped after the test."""

    def make() -> Database:
        scratch = hcrepo_database_factory()
        owner_url = scratch.bootstrap(owner_password=OWNER_PASSWORD)
        return _database(scratch.server, scratch.dbname, owner_url)

    return make


# --- seed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicSeed:
    """Ids of one seeded clinic's rows (a row in every tenant table); `user_ids` is its
    doctor (the provider's user) and its admin."""

    id: UUID
    name: str
    user_ids: tuple[UUID, ...]
    patient_ids: tuple[UUID, ...]
    provider_ids: tuple[UUID, ...]
    appointment_ids: tuple[UUID, ...]
    encounter_ids: tuple[UUID, ...]
    prescription_ids: tuple[UUID, ...]


@dataclass(frozen=True)
class Seed:
    """Three clinics: a and b with several patients, c with one. Treat as read-only."""

    a: ClinicSeed
    b: ClinicSeed
    c: ClinicSeed

    @property
    def clinics(self) -> tuple[ClinicSeed, ...]:
        return (self.a, self.b, self.c)


@pytest.fixture(scope="session")
def seeded(migrated_db: Database) -> Seed:
    """Rows for clinics A, B and C in migrated_db, written by the superuser (RLS bypassed).

    Tests that change data must use rows they create themselves.
    """
    with psycopg.connect(migrated_db.superuser_url) as conn:
        return Seed(
            a=_seed_clinic(conn, "Seed Clinic A", patients=3),
            b=_seed_clinic(conn, "Seed Clinic B", patients=2),
            c=_seed_clinic(conn, "Seed Clinic C", patients=1),
        )


def _insert(conn: psycopg.Connection[Any], table: str, **values: Any) -> UUID:
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING id").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    row = conn.execute(query, list(values.values())).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def _seed_clinic(conn: psycopg.Connection[Any], name: str, *, patients: int) -> ClinicSeed:
    tag = uuid.uuid4().hex[:8]
    clinic = _insert(conn, "clinics", name=name)
    user = _insert(
        conn, "users", email=f"doctor-{tag}@example.invalid", full_name=f"Dr Seed {tag}",
        role="doctor",
    )
    conn.execute(
        "INSERT INTO clinic_memberships (clinic_id, user_id, role) VALUES (%s, %s, 'doctor')",
        [clinic, user],
    )
    # Staff management is an admin's (migrations/0007): every seeded clinic has one.
    admin = _insert(
        conn, "users", email=f"admin-{tag}@example.invalid", full_name=f"Admin Seed {tag}",
        role="admin",
    )
    conn.execute(
        "INSERT INTO clinic_memberships (clinic_id, user_id, role) VALUES (%s, %s, 'admin')",
        [clinic, admin],
    )
    provider = _insert(
        conn, "providers", clinic_id=clinic, user_id=user, display_name=f"Dr Seed {tag}",
        specialty="general practice",
    )
    start = datetime(2030, 1, 7, 9, tzinfo=UTC)
    patient_ids, appointment_ids, encounter_ids, prescription_ids = [], [], [], []
    for n in range(patients):
        patient = _insert(
            conn, "patients", clinic_id=clinic, mrn=f"{tag}-{n:03d}", first_name="Seed",
            last_name=f"Patient{n}", date_of_birth="1980-01-01", sex="unknown",
        )
        slot = start + timedelta(minutes=30 * n)
        appointment = _insert(
            conn, "appointments", clinic_id=clinic, patient_id=patient, provider_id=provider,
            starts_at=slot, ends_at=slot + timedelta(minutes=30), status="completed",
        )
        encounter = _insert(
            conn, "encounters", clinic_id=clinic, patient_id=patient, provider_id=provider,
            appointment_id=appointment, occurred_at=slot, note="seed note",
        )
        prescription = _insert(
            conn, "prescriptions", clinic_id=clinic, patient_id=patient,
            prescriber_id=provider, encounter_id=encounter, drug_name="Placebo",
            dosage="1 tablet", frequency="daily", quantity=30,
        )
        patient_ids.append(patient)
        appointment_ids.append(appointment)
        encounter_ids.append(encounter)
        prescription_ids.append(prescription)
    conn.commit()
    return ClinicSeed(
        id=clinic, name=name, user_ids=(user, admin), patient_ids=tuple(patient_ids),
        provider_ids=(provider,), appointment_ids=tuple(appointment_ids),
        encounter_ids=tuple(encounter_ids), prescription_ids=tuple(prescription_ids),
    )


# --- row-level security, as the catalog says it is ----------------------------------------

# pg_get_expr of `clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)`,
# whitespace removed, the sub-select's column alias (which the deparser adds) ignored.
_TENANT_EXPR = re.compile(
    r"^\(clinic_id=\(SELECT\(NULLIF\(current_setting\('app\.clinic_id'::text,true\),"
    r"''::text\)\)::uuid(AS\"?\w+\"?)?\)\)$"
)

_TENANT_TABLES_SQL = """
SELECT c.oid, c.relname, c.relrowsecurity, c.relforcerowsecurity, a.attnum
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'clinic_id' AND NOT a.attisdropped
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
ORDER BY c.relname
"""

# Permissive policies that apply to the application role (by name or through PUBLIC).
_APP_POLICIES_SQL = """
SELECT p.polname, p.polcmd, pg_get_expr(p.polqual, p.polrelid),
       pg_get_expr(p.polwithcheck, p.polrelid)
FROM pg_policy p
WHERE p.polrelid = %s AND p.polpermissive
  AND (p.polroles && ARRAY[0::oid, (SELECT oid FROM pg_roles WHERE rolname = %s)])
ORDER BY p.polname
"""

_CLINIC_INDEX_SQL = """
SELECT EXISTS (SELECT FROM pg_index WHERE indrelid = %s AND indkey[0] = %s)
"""


def tenant_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Every table (partitions included) in public that has a clinic_id column."""
    return [row[1] for row in conn.execute(_TENANT_TABLES_SQL).fetchall()]


def rls_problems(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """For each table with clinic_id, what breaks tenant isolation (empty list: nothing)."""
    problems: dict[str, list[str]] = {}
    for oid, name, enabled, forced, attnum in conn.execute(_TENANT_TABLES_SQL).fetchall():
        found: list[str] = []
        if not enabled:
            found.append("row level security not enabled")
        if not forced:
            found.append("row level security not forced (the owner bypasses it)")
        policies = conn.execute(_APP_POLICIES_SQL, [oid, migrate.APP_ROLE]).fetchall()
        if not any(cmd == "*" for _, cmd, _, _ in policies):
            found.append(f"no FOR ALL policy for {migrate.APP_ROLE}")
        for policy, cmd, using, check in policies:
            # Permissive policies are OR-ed: any looser one opens the table.
            if using is None and cmd != "a":
                found.append(f"policy {policy} has no USING clause")
            if using is not None and not _is_tenant_expr(using):
                found.append(f"policy {policy} USING is not the app.clinic_id check")
            if check is None and cmd in ("*", "a", "w"):
                found.append(f"policy {policy} has no WITH CHECK clause")
            if check is not None and not _is_tenant_expr(check):
                found.append(f"policy {policy} WITH CHECK is not the app.clinic_id check")
        index = conn.execute(_CLINIC_INDEX_SQL, [oid, attnum]).fetchone()
        if not (index and index[0]):
            found.append("no index starting with clinic_id")
        problems[name] = found
    return problems


def _is_tenant_expr(expression: str) -> bool:
    return bool(_TENANT_EXPR.match(re.sub(r"\s+", "", expression)))
