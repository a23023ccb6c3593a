"""Tenant isolation as PostgreSQL enforces it, seen by `hcrepo_app` through plain psycopg.

One test per tenant table: the tables come from the CREATE TABLE statements of the
migrations (pytest needs them at collection time, before any server runs), and a catalog
test fails when the live database holds a table with clinic_id that got no test of its own.
So a table added later without row-level security fails the suite either way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from pglast import ast, parse_sql
from psycopg import sql
from psycopg_pool import ConnectionPool

from hcrepo.admin import migrate
from hcrepo.testing import PostgresServer
from tests.plugins.database import (
    Database,
    FreshDatabase,
    Seed,
    migrate_database,
    rls_problems,
    tenant_tables,
)
from tests.plugins.servers import WaitReplayed


def _declared_tenant_tables() -> list[str]:
    """Tables of schema public the forward migrations create with (or later give) a
    clinic_id column. The audit schema's tables carry clinic_id too, but the application role
    cannot read them and the auditor reads them across clinics (tests/test_audit*.py)."""
    tables: set[str] = set()
    for path in sorted(migrate.migrations_dir().glob("*.sql")):
        if path.name.endswith(".rollback.sql"):
            continue
        for raw in parse_sql(path.read_text()):
            stmt = raw.stmt
            relation = getattr(stmt, "relation", None)
            if getattr(relation, "schemaname", None) not in (None, "public"):
                # Tables of other schemas (audit) are not the application's to read: no
                # tenant policies there, as in the catalog check (tenant_tables).
                continue
            if isinstance(stmt, ast.CreateStmt):
                columns = {e.colname for e in stmt.tableElts or () if isinstance(e, ast.ColumnDef)}
                parents = {parent.relname for parent in stmt.inhRelations or ()}
                if "clinic_id" in columns or parents & tables:
                    tables.add(stmt.relation.relname)
            elif isinstance(stmt, ast.AlterTableStmt):
                for cmd in stmt.cmds or ():
                    column = getattr(cmd, "def_", None)
                    if isinstance(column, ast.ColumnDef) and column.colname == "clinic_id":
                        tables.add(stmt.relation.relname)
            elif isinstance(stmt, ast.DropStmt):
                for name in stmt.objects or ():
                    if isinstance(name, tuple | list):
                        tables.discard(name[-1].sval)
    return sorted(tables)


TENANT_TABLES = _declared_tenant_tables()


def _set_clinic(
    conn: psycopg.Connection[Any], clinic_id: UUID | str | None, actor_id: UUID | None = None
) -> None:
    """The clinic (and the staff member acting: the staff role rules of migrations/0007 give
    clinical rows and directory changes only to members in the right role)."""
    conn.execute(
        "SELECT set_config('app.clinic_id', %s, true), set_config('app.actor_id', %s, true)",
        ["" if clinic_id is None else str(clinic_id), "" if actor_id is None else str(actor_id)],
    )


@pytest.fixture
def app_conn(migrated_db: Database, seeded: Seed) -> Iterator[psycopg.Connection[Any]]:
    """hcrepo_app, one transaction per test, rolled back at the end."""
    with psycopg.connect(migrated_db.app_url) as conn:
        yield conn
        conn.rollback()


@pytest.fixture
def super_conn(migrated_db: Database) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        yield conn


# --- one test per tenant table ------------------------------------------------------------


def test_migrations_declare_tenant_tables() -> None:
    assert {"patients", "appointments", "clinic_memberships"} <= set(TENANT_TABLES)


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_table_is_isolated(
    table: str,
    seeded: Seed,
    app_conn: psycopg.Connection[Any],
    super_conn: psycopg.Connection[Any],
) -> None:
    assert rls_problems(super_conn).get(table, ["missing from the catalog"]) == []

    name = sql.Identifier(table)
    count = sql.SQL("SELECT count(*), count(*) FILTER (WHERE clinic_id <> %s) FROM {}")
    readable = super_conn.execute("SELECT has_any_column_privilege(%s, %s, 'SELECT')",
                                  [migrate.APP_ROLE, table]).fetchone()
    if readable == (False,):
        # Kept from the application altogether (plaintext waiting to be encrypted, say):
        # its policies still isolate the owner's work by clinic.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), app_conn.transaction():
            app_conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name))
        return
    for clinic in seeded.clinics:
        row = super_conn.execute(count.format(name), [clinic.id]).fetchone()
        assert row is not None
        everywhere, elsewhere = row
        expected = everywhere - elsewhere
        with app_conn.transaction():
            _set_clinic(app_conn, clinic.id, clinic.user_ids[0])
            assert app_conn.execute(count.format(name), [clinic.id]).fetchone() == (expected, 0)
    with app_conn.transaction():
        _set_clinic(app_conn, None)
        assert app_conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone() == (0,)


def test_every_tenant_table_in_the_catalog_has_its_own_test(
    super_conn: psycopg.Connection[Any],
) -> None:
    assert set(tenant_tables(super_conn)) - set(TENANT_TABLES) == set()


def test_the_checks_catch_a_tenant_table_without_rls(fresh_database: FreshDatabase) -> None:
    db = fresh_database()
    migrate_database(db)
    tenant = "clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)"
    with psycopg.connect(db.owner_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE rogue_plain (clinic_id uuid NOT NULL)")
        for table in ("rogue_not_forced", "rogue_loose"):
            conn.execute(f"CREATE TABLE {table} (clinic_id uuid NOT NULL)")
            conn.execute(f"CREATE INDEX ON {table} (clinic_id)")
            conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            conn.execute(
                f"CREATE POLICY tenant_isolation ON {table} TO hcrepo_app"
                f" USING ({tenant}) WITH CHECK ({tenant})"
            )
        conn.execute("ALTER TABLE rogue_loose FORCE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY peek ON rogue_loose FOR SELECT USING (true)")

        problems = rls_problems(conn)
        assert set(tenant_tables(conn)) - set(TENANT_TABLES) == {
            "rogue_plain", "rogue_not_forced", "rogue_loose",
        }

    assert {table: found for table, found in problems.items() if found} == {
        "rogue_plain": [
            "row level security not enabled",
            "row level security not forced (the owner bypasses it)",
            "no FOR ALL policy for hcrepo_app",
            "no index starting with clinic_id",
        ],
        "rogue_not_forced": ["row level security not forced (the owner bypasses it)"],
        "rogue_loose": ["policy peek USING is not the app.clinic_id check"],
    }


# --- what the application role sees and may do -------------------------------------------


def test_clinic_sees_only_its_own_patients(seeded: Seed, app_conn: psycopg.Connection[Any]) -> None:
    for clinic in seeded.clinics:
        with app_conn.transaction():
            _set_clinic(app_conn, clinic.id)
            rows = app_conn.execute("SELECT id FROM patients").fetchall()
        assert sorted(row[0] for row in rows) == sorted(clinic.patient_ids)


@pytest.mark.parametrize("value", ["", None])
def test_empty_or_reset_context_sees_nothing(
    value: str | None, seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    app_conn.execute("SELECT set_config('app.clinic_id', %s, false)", [str(seeded.a.id)])
    if value is None:
        app_conn.execute("RESET app.clinic_id")
    else:
        _set_clinic(app_conn, value)
    assert app_conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)


def test_a_malformed_clinic_id_fails_closed(app_conn: psycopg.Connection[Any]) -> None:
    _set_clinic(app_conn, "not-a-uuid")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        app_conn.execute("SELECT count(*) FROM patients")


def test_inserting_a_row_for_another_clinic_fails(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    _set_clinic(app_conn, seeded.a.id)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        app_conn.execute(
            "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
            " VALUES (%s, 'rls-insert', 'Not', 'Allowed', '2000-01-01', 'unknown')",
            [seeded.b.id],
        )


def test_moving_a_row_to_another_clinic_fails(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    _set_clinic(app_conn, seeded.a.id, seeded.a.user_ids[0])
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        app_conn.execute(
            "UPDATE patients SET clinic_id = %s WHERE id = %s",
            [seeded.b.id, seeded.a.patient_ids[0]],
        )


def test_another_clinics_rows_cannot_be_changed(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    _set_clinic(app_conn, seeded.a.id)
    changed = app_conn.execute(
        "UPDATE patients SET phone = '+1 555 0199' WHERE id = %s", [seeded.b.patient_ids[0]]
    )
    assert changed.rowcount == 0


def test_another_clinics_patient_cannot_be_referenced(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    # Foreign-key checks bypass RLS; the (clinic_id, patient_id) key is what stops this.
    _set_clinic(app_conn, seeded.a.id, seeded.a.user_ids[0])
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        app_conn.execute(
            "INSERT INTO appointments (clinic_id, patient_id, provider_id, starts_at, ends_at)"
            " VALUES (%s, %s, %s, '2032-01-01 09:00Z', '2032-01-01 09:30Z')",
            [seeded.a.id, seeded.b.patient_ids[0], seeded.a.provider_ids[0]],
        )


def test_a_pooled_connection_forgets_the_clinic(migrated_db: Database, seeded: Seed) -> None:
    with ConnectionPool(migrated_db.app_url, min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            _set_clinic(conn, seeded.a.id)
            first = conn.execute("SELECT pg_backend_pid(), count(*) FROM patients").fetchone()
        with pool.connection() as conn:
            second = conn.execute(
                "SELECT pg_backend_pid(), count(*), current_setting('app.clinic_id', true)"
                " FROM patients"
            ).fetchone()
    assert first is not None and second is not None
    pid, seen = first
    assert seen == len(seeded.a.patient_ids)
    assert second == (pid, 0, "")  # the same server session, no clinic left in it


def test_clinics_directory_is_readable_but_only_the_own_clinic_is_writable(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    _set_clinic(app_conn, seeded.a.id, seeded.a.user_ids[1])  # its admin
    visible = {row[0] for row in app_conn.execute("SELECT id FROM clinics").fetchall()}
    assert {clinic.id for clinic in seeded.clinics} <= visible
    rename = "UPDATE clinics SET timezone = 'Europe/Berlin' WHERE id = %s"
    assert app_conn.execute(rename, [seeded.a.id]).rowcount == 1
    assert app_conn.execute(rename, [seeded.b.id]).rowcount == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        app_conn.execute("UPDATE clinics SET id = %s WHERE id = %s", [seeded.b.id, seeded.a.id])


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE patients DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE patients NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON patients",
        "ALTER POLICY tenant_isolation ON patients USING (true)",
        "CREATE POLICY open ON patients FOR SELECT USING (true)",
        "ALTER TABLE patients OWNER TO hcrepo_app",
        "SET ROLE hcrepo_owner",
        "ALTER ROLE hcrepo_app BYPASSRLS",
        "CREATE TABLE public.sneaky (id int)",
        "TRUNCATE patients",
        "DELETE FROM patients",
        "DELETE FROM encounters",
        "DELETE FROM clinics",
        "DROP TABLE patients",
        "INSERT INTO users (email, full_name, role) VALUES ('x@example.invalid', 'X', 'admin')",
        "UPDATE users SET email = 'x@example.invalid'",
        "UPDATE users SET role = 'admin'",
        "CREATE TEMP VIEW carried AS SELECT 1",
        "SELECT 1 AS n INTO TEMP carried",
    ],
)
def test_app_role_cannot_lift_isolation(
    statement: str, seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    _set_clinic(app_conn, seeded.a.id)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_conn.execute(statement)


def test_row_security_off_is_an_error_not_a_bypass(app_conn: psycopg.Connection[Any]) -> None:
    app_conn.execute("SET row_security = off")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        app_conn.execute("SELECT count(*) FROM patients")


def test_app_role_is_unprivileged_and_owns_nothing(super_conn: psycopg.Connection[Any]) -> None:
    role = super_conn.execute(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin"
        " FROM pg_roles WHERE rolname = %s",
        [migrate.APP_ROLE],
    ).fetchone()
    assert role == (False, False, False, False, False, True)
    owned = super_conn.execute(
        "SELECT count(*) FROM pg_shdepend WHERE deptype = 'o' AND refobjid = %s::regrole",
        [migrate.APP_ROLE],
    ).fetchone()
    assert owned == (0,)
    memberships = super_conn.execute(
        "SELECT count(*) FROM pg_auth_members WHERE member = %s::regrole", [migrate.APP_ROLE]
    ).fetchone()
    assert memberships == (0,)


def test_app_role_has_only_the_table_privileges_it_needs(
    super_conn: psycopg.Connection[Any],
) -> None:
    granted = dict(super_conn.execute(
        "SELECT table_name, string_agg(privilege_type, ',' ORDER BY privilege_type)"
        " FROM information_schema.role_table_grants"
        " WHERE grantee = %s AND table_schema = 'public' GROUP BY table_name",
        [migrate.APP_ROLE],
    ).fetchall())
    never = {"TRUNCATE", "REFERENCES", "TRIGGER"}
    assert {table: privileges for table, privileges in granted.items()
            if never & set(privileges.split(",")) or "yoyo" in table} == {}
    read_write = "INSERT,SELECT,UPDATE"
    expected = {
        "clinics": read_write,
        "users": "SELECT",
        "clinic_memberships": "DELETE,INSERT,SELECT,UPDATE",
        # SELECT on every column but ssn (0008_field_encryption; patient_records gives it
        # to the roles that may see it).
        "patients": "INSERT,UPDATE",
        "providers": read_write,
        "appointments": read_write,
        "encounters": read_write,
        "prescriptions": read_write,
    }
    assert {table: granted.get(table) for table in expected} == expected
    columns = super_conn.execute(
        "SELECT table_name, column_name, privilege_type FROM information_schema.column_privileges"
        " WHERE grantee = %s AND table_name = 'users' AND privilege_type <> 'SELECT'"
        " ORDER BY column_name",
        [migrate.APP_ROLE],
    ).fetchall()
    assert columns == [("users", "active", "UPDATE"), ("users", "full_name", "UPDATE")]


def test_isolation_holds_on_a_replica(
    migrated_db: Database,
    seeded: Seed,
    pg_replica: PostgresServer,
    wait_replayed: WaitReplayed,
) -> None:
    wait_replayed(pg_replica)
    with psycopg.connect(migrated_db.replica_app_url(pg_replica)) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)
        _set_clinic(conn, seeded.b.id)
        rows = conn.execute("SELECT id FROM patients").fetchall()
    assert sorted(row[0] for row in rows) == sorted(seeded.b.patient_ids)


# --- the staff directory ------------------------------------------------------------------


def _staff_member_of(super_conn: psycopg.Connection[Any], *clinics: UUID) -> UUID:
    """A new user with a membership in each of `clinics`, written by the superuser."""
    row = super_conn.execute(
        "INSERT INTO users (email, full_name, role) VALUES (%s, 'Shared Nurse', 'nurse')"
        " RETURNING id",
        [f"nurse-{uuid.uuid4().hex[:10]}@example.invalid"],
    ).fetchone()
    assert row is not None
    for clinic in clinics:
        super_conn.execute(
            "INSERT INTO clinic_memberships (clinic_id, user_id, role) VALUES (%s, %s, 'nurse')",
            [clinic, row[0]],
        )
    return UUID(str(row[0]))


def test_a_clinic_sees_only_its_own_staff(
    seeded: Seed, app_conn: psycopg.Connection[Any], super_conn: psycopg.Connection[Any]
) -> None:
    doctor = seeded.b.user_ids[0]
    _set_clinic(app_conn, seeded.a.id)
    assert app_conn.execute("SELECT email FROM users WHERE id = %s", [doctor]).fetchall() == []
    deactivate = app_conn.execute("UPDATE users SET active = false WHERE id = %s", [doctor])
    assert deactivate.rowcount == 0
    members = super_conn.execute(
        "SELECT user_id FROM clinic_memberships WHERE clinic_id = %s", [seeded.a.id]
    ).fetchall()
    visible = app_conn.execute("SELECT id FROM users").fetchall()
    assert sorted(visible) == sorted(members)
    assert super_conn.execute(
        "SELECT active FROM users WHERE id = %s", [doctor]
    ).fetchone() == (True,)
    _set_clinic(app_conn, None)
    assert app_conn.execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_a_user_of_two_clinics_is_visible_in_both(
    seeded: Seed, app_conn: psycopg.Connection[Any], super_conn: psycopg.Connection[Any]
) -> None:
    nurse = _staff_member_of(super_conn, seeded.a.id, seeded.b.id)
    try:
        for clinic, seen in ((seeded.a, [(nurse,)]), (seeded.b, [(nurse,)]), (seeded.c, [])):
            with app_conn.transaction():
                _set_clinic(app_conn, clinic.id)
                found = app_conn.execute("SELECT id FROM users WHERE id = %s", [nurse])
                assert found.fetchall() == seen, clinic.name
    finally:
        super_conn.execute("DELETE FROM clinic_memberships WHERE user_id = %s", [nurse])
        super_conn.execute("DELETE FROM users WHERE id = %s", [nurse])


def test_onboarding_creates_the_user_and_its_membership_in_the_clinic(
    seeded: Seed, app_conn: psycopg.Connection[Any]
) -> None:
    email = f"new-{uuid.uuid4().hex[:10]}@example.invalid"
    _set_clinic(app_conn, seeded.c.id, seeded.c.user_ids[1])  # its admin
    row = app_conn.execute(
        "SELECT id, email, role FROM onboard_staff(%s, 'New Nurse', 'nurse')", [email]
    ).fetchone()
    assert row is not None and row[1:] == (email, "nurse")
    member = app_conn.execute(
        "SELECT clinic_id, role FROM clinic_memberships WHERE user_id = %s", [row[0]]
    ).fetchall()
    assert member == [(seeded.c.id, "nurse")]
    assert app_conn.execute("SELECT count(*) FROM users WHERE id = %s", [row[0]]).fetchone() == (
        1,)


@pytest.mark.parametrize("clinic", ["", None])
def test_onboarding_is_refused_without_a_clinic(
    clinic: str | None, app_conn: psycopg.Connection[Any]
) -> None:
    if clinic is not None:
        _set_clinic(app_conn, clinic)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs a clinic"):
        app_conn.execute("SELECT * FROM onboard_staff('none@example.invalid', 'No One', 'nurse')")


def test_onboarding_an_existing_email_never_attaches_that_account(
    seeded: Seed, app_conn: psycopg.Connection[Any], super_conn: psycopg.Connection[Any]
) -> None:
    doctor = seeded.b.user_ids[0]
    email = super_conn.execute("SELECT email FROM users WHERE id = %s", [doctor]).fetchone()
    assert email is not None
    _set_clinic(app_conn, seeded.a.id, seeded.a.user_ids[1])  # its admin
    with pytest.raises(psycopg.errors.UniqueViolation):
        app_conn.execute("SELECT * FROM onboard_staff(%s, 'Taken Over', 'admin')", [email[0]])
    app_conn.rollback()
    assert super_conn.execute(
        "SELECT clinic_id FROM clinic_memberships WHERE user_id = %s", [doctor]
    ).fetchall() == [(seeded.b.id,)]


def test_onboard_staff_is_a_locked_down_definer_function(
    super_conn: psycopg.Connection[Any],
) -> None:
    row = super_conn.execute(
        "SELECT p.prosecdef, p.proowner::regrole::text, p.proconfig,"
        " has_function_privilege(%s, p.oid, 'EXECUTE'),"
        " has_function_privilege('public', p.oid, 'EXECUTE')"
        " FROM pg_proc p WHERE p.oid = 'onboard_staff(text, text, text)'::regprocedure",
        [migrate.APP_ROLE],
    ).fetchone()
    assert row == (True, migrate.OWNER_ROLE, ["search_path=pg_catalog, pg_temp"], True, False)


# --- nothing a pooled connection keeps carries data to the next clinic --------------------


def test_app_role_cannot_create_temporary_tables(
    app_conn: psycopg.Connection[Any], super_conn: psycopg.Connection[Any]
) -> None:
    assert super_conn.execute(
        "SELECT has_database_privilege(%s, current_database(), 'TEMP')", [migrate.APP_ROLE]
    ).fetchone() == (False,)
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
        app_conn.execute("CREATE TEMP TABLE carried AS SELECT id FROM patients")
    assert refused.value.sqlstate == "42501"
