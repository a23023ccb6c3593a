"""The yoyo migrations: apply, roll back to empty, re-apply, fail atomically; schema rules."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import hcrepo
from hcrepo.admin import migrate
from tests.plugins.database import Database, FreshDatabase, Seed

# Everything a migration could leave behind in the database, yoyo's own bookkeeping excepted.
_SCHEMA_SQL = """
SELECT 'relation ' || c.relname || ' ' || c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relname !~ '^_*yoyo'
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relname !~ '^_*yoyo' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint
WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text !~ '^_*yoyo'
UNION ALL
SELECT 'policy ' || polname || ' on ' || polrelid::regclass FROM pg_policy
UNION ALL
SELECT 'rls ' || relname FROM pg_class WHERE relrowsecurity OR relforcerowsecurity
UNION ALL
SELECT 'function ' || oid::regprocedure FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'type ' || typname FROM pg_type
WHERE typnamespace = 'public'::regnamespace AND typname !~ '^_*yoyo'
UNION ALL
SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'extension ' || extname FROM pg_extension
UNION ALL
SELECT 'schema acl ' || coalesce(nspacl::text, '') FROM pg_namespace WHERE nspname = 'public'
UNION ALL
SELECT 'default acl ' || defaclacl::text FROM pg_default_acl
UNION ALL
SELECT 'database privilege ' || privilege || ' '
       || has_database_privilege('public', current_database(), privilege)
FROM unnest(ARRAY['CONNECT', 'TEMPORARY']) AS privilege
"""

_TABLES = {
    "clinics", "users", "clinic_memberships", "patients", "providers", "appointments",
    "encounters", "prescriptions", "clinic_data_keys", "key_rotations", "patients_plaintext_ssn",
}


def _schema(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute(_SCHEMA_SQL).fetchall()}


def _tables(schema: set[str]) -> set[str]:
    return {item.split()[1] for item in schema if item.startswith("relation ") and item[-1] == "r"}


def _applied(db: Database, source: Path | None = None) -> list[str]:
    states = migrate.status(db.owner_url, setting="owner URL", source=source)
    return [state.id for state in states if state.applied]


def test_every_migration_has_a_rollback() -> None:
    forward = sorted(
        path for path in migrate.migrations_dir().glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )
    assert forward, "no migrations found"
    missing = [p.name for p in forward if not p.with_suffix(".rollback.sql").is_file()]
    assert missing == []


def test_migrations_apply_to_empty_and_roll_back_to_empty(fresh_database: FreshDatabase) -> None:
    db = fresh_database()
    empty = _schema(db.superuser_url)
    assert _tables(empty) == set()

    applied = migrate.apply(db.owner_url, setting="owner URL")
    assert applied == [path.stem for path in sorted(migrate.migrations_dir().glob("0*.sql"))
                       if not path.name.endswith(".rollback.sql")]
    migrated = _schema(db.superuser_url)
    assert _tables(migrated) == _TABLES

    undone = migrate.rollback(db.owner_url, setting="owner URL", count=None)
    assert undone == list(reversed(applied))
    assert _schema(db.superuser_url) == empty
    assert _applied(db) == []

    assert migrate.apply(db.owner_url, setting="owner URL") == applied
    assert _schema(db.superuser_url) == migrated


def test_rollback_count_undoes_only_the_latest(fresh_database: FreshDatabase) -> None:
    db = fresh_database()
    applied = migrate.apply(db.owner_url, setting="owner URL")

    directory = applied.index("0002_directory") + 1
    later = applied[directory:]
    assert migrate.rollback(db.owner_url, setting="owner URL", count=len(later)) == (
        list(reversed(later)))
    assert _applied(db) == applied[:directory]
    assert _tables(_schema(db.superuser_url)) == {"clinics", "users", "clinic_memberships"}
    assert migrate.apply(db.owner_url, setting="owner URL") == applied[directory:]
    assert migrate.apply(db.owner_url, setting="owner URL") == []


def test_a_migration_failing_midway_leaves_the_database_as_it_was(
    fresh_database: FreshDatabase, tmp_path: Path
) -> None:
    db = fresh_database()
    applied = migrate.apply(db.owner_url, setting="owner URL")
    before = _schema(db.superuser_url)
    source = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), source)
    (source / "0999_broken.sql").write_text(
        f"-- depends: {applied[-1]}\n"
        "CREATE TABLE half_done (id integer);\n"
        "ALTER TABLE patients ADD COLUMN half_done text;\n"
        "INSERT INTO users (email, full_name, role) VALUES ('x@example.invalid', 'X', 'nurse');\n"
        "SELECT 1 / 0;\n"
    )
    (source / "0999_broken.rollback.sql").write_text("DROP TABLE half_done;\n")

    with pytest.raises(migrate.MigrationFailed) as failed:
        migrate.apply(db.owner_url, setting="owner URL", source=source)

    assert failed.value.migration == "0999_broken"
    assert failed.value.sqlstate == "22012"  # division_by_zero
    assert _schema(db.superuser_url) == before
    with psycopg.connect(db.superuser_url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
    assert _applied(db, source) == applied


def test_migrations_dir_is_the_checkout_or_the_wheel_copy() -> None:
    found = migrate.migrations_dir()
    assert found in (
        Path(hcrepo.__file__).parent / "_data" / "migrations",
        Path(hcrepo.__file__).parents[1] / "migrations",
    )
    assert (found / "0001_roles.sql").is_file()


# --- schema rules the database enforces on its own -------------------------------------


def _book(
    conn: psycopg.Connection[Any], seed: Seed, start: datetime, minutes: int, status: str
) -> None:
    conn.execute(
        "INSERT INTO appointments (clinic_id, patient_id, provider_id, starts_at, ends_at, status)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        [seed.a.id, seed.a.patient_ids[0], seed.a.provider_ids[0], start,
         start + timedelta(minutes=minutes), status],
    )


def test_a_provider_cannot_be_double_booked(migrated_db: Database, seeded: Seed) -> None:
    start = datetime(2031, 3, 3, 10, tzinfo=UTC)
    with psycopg.connect(migrated_db.superuser_url) as conn:
        _book(conn, seeded, start, 30, "scheduled")
        _book(conn, seeded, start + timedelta(minutes=30), 30, "scheduled")  # back to back
        _book(conn, seeded, start + timedelta(minutes=10), 10, "cancelled")  # frees its slot
        with pytest.raises(psycopg.errors.ExclusionViolation) as clash:
            _book(conn, seeded, start + timedelta(minutes=15), 30, "scheduled")
        assert clash.value.diag.constraint_name == "appointments_no_double_booking"
        conn.rollback()


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("patients", "sex", "robot"),
        ("appointments", "status", "maybe"),
        ("prescriptions", "quantity", 0),
        ("prescriptions", "refills", -1),
        ("users", "role", "janitor"),
    ],
)
def test_check_constraints_refuse_bad_values(
    migrated_db: Database, seeded: Seed, table: str, column: str, value: object
) -> None:
    row_id = {
        "patients": seeded.a.patient_ids[0],
        "appointments": seeded.a.appointment_ids[0],
        "prescriptions": seeded.a.prescription_ids[0],
        "users": seeded.a.user_ids[0],
    }[table]
    with psycopg.connect(migrated_db.superuser_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                psycopg.sql.SQL("UPDATE {} SET {} = %s WHERE id = %s").format(
                    psycopg.sql.Identifier(table), psycopg.sql.Identifier(column)
                ),
                [value, row_id],
            )
        conn.rollback()


def test_appointments_must_end_after_they_start(migrated_db: Database, seeded: Seed) -> None:
    with psycopg.connect(migrated_db.superuser_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            _book(conn, seeded, datetime(2031, 3, 4, 10, tzinfo=UTC), 0, "scheduled")
        conn.rollback()


def test_updated_at_follows_every_update(migrated_db: Database, seeded: Seed) -> None:
    with psycopg.connect(migrated_db.superuser_url) as conn:
        # now() is the transaction's start: run the update in a later transaction.
        created = conn.execute(
            "SELECT updated_at FROM patients WHERE id = %s", [seeded.a.patient_ids[0]]
        ).fetchone()
        conn.commit()
        updated = conn.execute(
            "UPDATE patients SET phone = '+1 555 0100', updated_at = '2000-01-01'"
            " WHERE id = %s RETURNING updated_at",
            [seeded.a.patient_ids[0]],
        ).fetchone()
        conn.rollback()
    assert created is not None and updated is not None
    assert updated[0] > created[0]
