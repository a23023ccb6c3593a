"""Minimum necessary as PostgreSQL enforces it: the role matrix, cell by cell, as hcrepo_app.

MATRIX is the declaration migrations/0007 is checked against: for every table of the
healthcare schema and every operation, the staff roles allowed (CLINIC_LEVEL: a context with
a clinic and no actor, such as a batch job). Every cell runs raw SQL as hcrepo_app in its
own rolled-back transaction, with the role claimed through set_config as hcrepo sends it. The
tables come from the catalog: a table hcrepo_app can reach, or with a clinic_id, that has no
row here fails the suite, and so does a table with a clinic_id outside it that hcrepo_app can
touch at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.plugins.database import Database
from tests.support.staff import ROLES, StaffClinic, staff_clinic

CLINIC_LEVEL = "clinic-level"
OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE")
ALL = frozenset(ROLES)
CLINICAL = frozenset({"doctor", "nurse"})
CARE = frozenset({"doctor", "nurse", "receptionist"})
NONE: frozenset[str] = frozenset()
# Reads of the front desk's scope; no write at all.
FRONT_DESK_READ = ALL | {CLINIC_LEVEL}

MATRIX: dict[str, dict[str, frozenset[str]]] = {
    "clinics": {"SELECT": FRONT_DESK_READ, "INSERT": FRONT_DESK_READ,
                "UPDATE": frozenset({"admin"}), "DELETE": NONE},
    "users": {"SELECT": FRONT_DESK_READ, "INSERT": NONE, "UPDATE": frozenset({"admin"}),
              "DELETE": NONE},
    "clinic_memberships": {"SELECT": FRONT_DESK_READ, "INSERT": frozenset({"admin"}),
                           "UPDATE": frozenset({"admin"}), "DELETE": frozenset({"admin"})},
    "providers": {"SELECT": FRONT_DESK_READ, "INSERT": frozenset({"admin"}),
                  "UPDATE": frozenset({"doctor", "nurse", "admin"}), "DELETE": NONE},
    "patients": {"SELECT": FRONT_DESK_READ, "INSERT": CARE, "UPDATE": CARE, "DELETE": NONE},
    "appointments": {"SELECT": FRONT_DESK_READ, "INSERT": CARE, "UPDATE": CARE,
                     "DELETE": NONE},
    # Signed notes; a draft is its author's (see test_a_draft_note_is_its_authors). UPDATE:
    # the author only, who here is the doctor.
    "encounters": {"SELECT": CLINICAL, "INSERT": CLINICAL, "UPDATE": frozenset({"doctor"}),
                   "DELETE": NONE},
    "prescriptions": {"SELECT": CLINICAL, "INSERT": frozenset({"doctor"}), "UPDATE": CLINICAL,
                      "DELETE": NONE},
    # Patients as the application reads them, SSN ciphertext included (a view: its SELECT
    # cell reads the SSN, which only doctors and admins get; the others see it NULL).
    "patient_records": {"SELECT": frozenset({"doctor", "admin"}), "INSERT": NONE,
                        "UPDATE": NONE, "DELETE": NONE},
    # Wrapped data keys (useless without the master key): whoever may write an SSN creates
    # the clinic's first one; rotation, as the owner, changes them.
    "clinic_data_keys": {"SELECT": FRONT_DESK_READ, "INSERT": FRONT_DESK_READ,
                         "UPDATE": NONE, "DELETE": NONE},
    "key_rotations": {"SELECT": FRONT_DESK_READ, "INSERT": NONE, "UPDATE": NONE,
                      "DELETE": NONE},
    # Plaintext SSNs set aside by the encryption migration: the owner's alone.
    "patients_plaintext_ssn": {"SELECT": NONE, "INSERT": NONE, "UPDATE": NONE, "DELETE": NONE},
}

# One statement per cell; each touches the staff clinic's own rows (a refusal is an error
# or no row affected).
STATEMENTS: dict[str, dict[str, str]] = {
    "clinics": {
        "SELECT": "SELECT id FROM clinics WHERE id = %(clinic)s",
        "INSERT": "INSERT INTO clinics (name) VALUES ('matrix')",
        "UPDATE": "UPDATE clinics SET timezone = 'UTC' WHERE id = %(clinic)s",
        "DELETE": "DELETE FROM clinics WHERE id = %(clinic)s",
    },
    "users": {
        "SELECT": "SELECT id FROM users WHERE id = %(doctor)s",
        "INSERT": "INSERT INTO users (email, full_name, role)"
                  " VALUES (%(email)s, 'Matrix', 'nurse')",
        "UPDATE": "UPDATE users SET full_name = full_name WHERE id = %(doctor)s",
        "DELETE": "DELETE FROM users WHERE id = %(doctor)s",
    },
    "clinic_memberships": {
        "SELECT": "SELECT user_id FROM clinic_memberships WHERE clinic_id = %(clinic)s",
        "INSERT": "INSERT INTO clinic_memberships (clinic_id, user_id, role)"
                  " VALUES (%(clinic)s, %(outsider)s, 'nurse')",
        "UPDATE": "UPDATE clinic_memberships SET role = role WHERE user_id = %(doctor)s",
        "DELETE": "DELETE FROM clinic_memberships WHERE user_id = %(doctor)s",
    },
    "providers": {
        "SELECT": "SELECT id FROM providers WHERE id = %(provider)s",
        "INSERT": "INSERT INTO providers (clinic_id, display_name)"
                  " VALUES (%(clinic)s, 'Dr Matrix')",
        "UPDATE": "UPDATE providers SET on_call = on_call WHERE id = %(provider)s",
        "DELETE": "DELETE FROM providers WHERE id = %(provider)s",
    },
    "patients": {
        "SELECT": "SELECT id FROM patients WHERE id = %(patient)s",
        "INSERT": "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth,"
                  " sex) VALUES (%(clinic)s, %(mrn)s, 'M', 'Atrix', '2000-01-01', 'unknown')",
        "UPDATE": "UPDATE patients SET phone = '+1 555 0142' WHERE id = %(patient)s",
        "DELETE": "DELETE FROM patients WHERE id = %(patient)s",
    },
    "appointments": {
        "SELECT": "SELECT id FROM appointments WHERE id = %(appointment)s",
        "INSERT": "INSERT INTO appointments (clinic_id, patient_id, provider_id, starts_at,"
                  " ends_at) VALUES (%(clinic)s, %(patient)s, %(provider)s,"
                  " '2031-02-03 10:00Z', '2031-02-03 10:30Z')",
        "UPDATE": "UPDATE appointments SET reason = 'matrix' WHERE id = %(appointment)s",
        "DELETE": "DELETE FROM appointments WHERE id = %(appointment)s",
    },
    "encounters": {
        "SELECT": "SELECT id FROM encounters WHERE id = %(signed)s",
        "INSERT": "INSERT INTO encounters (clinic_id, patient_id, provider_id, occurred_at,"
                  " note) VALUES (%(clinic)s, %(patient)s, %(provider)s, now(), 'matrix')",
        "UPDATE": "UPDATE encounters SET note = 'amended' WHERE id = %(signed)s",
        "DELETE": "DELETE FROM encounters WHERE id = %(signed)s",
    },
    "prescriptions": {
        "SELECT": "SELECT id FROM prescriptions WHERE id = %(prescription)s",
        "INSERT": "INSERT INTO prescriptions (clinic_id, patient_id, prescriber_id, drug_name,"
                  " dosage, frequency, quantity) VALUES (%(clinic)s, %(patient)s,"
                  " %(provider)s, 'Placebo', '1', 'daily', 5)",
        "UPDATE": "UPDATE prescriptions SET refills = refills WHERE id = %(prescription)s",
        "DELETE": "DELETE FROM prescriptions WHERE id = %(prescription)s",
    },
    "patient_records": {
        "SELECT": "SELECT id FROM patient_records WHERE id = %(patient)s AND ssn IS NOT NULL",
        "INSERT": "INSERT INTO patient_records (clinic_id, mrn, first_name, last_name,"
                  " date_of_birth, sex) VALUES (%(clinic)s, %(mrn)s, 'M', 'Atrix', '2000-01-01',"
                  " 'unknown')",
        "UPDATE": "UPDATE patient_records SET phone = '+1 555 0142' WHERE id = %(patient)s",
        "DELETE": "DELETE FROM patient_records WHERE id = %(patient)s",
    },
    "clinic_data_keys": {
        "SELECT": "SELECT version FROM clinic_data_keys WHERE clinic_id = %(clinic)s",
        "INSERT": "INSERT INTO clinic_data_keys (clinic_id, version, master_version, wrapped,"
                  " state) VALUES (%(clinic)s, 2, 1, '\\x00', 'retired')",
        "UPDATE": "UPDATE clinic_data_keys SET state = state WHERE clinic_id = %(clinic)s",
        "DELETE": "DELETE FROM clinic_data_keys WHERE clinic_id = %(clinic)s",
    },
    "key_rotations": {
        "SELECT": "SELECT id FROM key_rotations WHERE clinic_id = %(clinic)s",
        "INSERT": "INSERT INTO key_rotations (clinic_id, kind, event, to_version)"
                  " VALUES (%(clinic)s, 'data', 'completed', 1)",
        "UPDATE": "UPDATE key_rotations SET to_version = 1 WHERE clinic_id = %(clinic)s",
        "DELETE": "DELETE FROM key_rotations WHERE clinic_id = %(clinic)s",
    },
    "patients_plaintext_ssn": {
        "SELECT": "SELECT patient_id FROM patients_plaintext_ssn WHERE clinic_id = %(clinic)s",
        "INSERT": "INSERT INTO patients_plaintext_ssn (patient_id, clinic_id, ssn)"
                  " VALUES (gen_random_uuid(), %(clinic)s, '000-00-0000')",
        "UPDATE": "UPDATE patients_plaintext_ssn SET ssn = ssn WHERE clinic_id = %(clinic)s",
        "DELETE": "DELETE FROM patients_plaintext_ssn WHERE clinic_id = %(clinic)s",
    },
}

# Tables hcrepo_app can reach in any way, or that carry a clinic_id, in every schema but the
# catalogs; the ones of the healthcare schema (public) need a row in MATRIX.
_REACHABLE_SQL = """
SELECT n.nspname, c.relname,
       EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'clinic_id'
                                             AND NOT a.attisdropped),
       has_table_privilege('hcrepo_app', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE,
                           REFERENCES, TRIGGER'),
       has_table_privilege('hcrepo_app', c.oid, 'SELECT, UPDATE, DELETE, TRUNCATE,
                           REFERENCES, TRIGGER')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
ORDER BY 1, 2
"""

CELLS = [
    (table, operation, role)
    for table in MATRIX for operation in OPERATIONS for role in (*ROLES, CLINIC_LEVEL)
]


@pytest.fixture(scope="module")
def staff(migrated_db: Database) -> StaffClinic:
    return staff_clinic(migrated_db.superuser_url)


@pytest.fixture
def app_conn(migrated_db: Database) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db.app_url) as conn:
        yield conn
        conn.rollback()


def _act(conn: psycopg.Connection[Any], clinic: uuid.UUID, actor: uuid.UUID | None,
         role: str | None, reason: str = "", access: str = "") -> None:
    """The context as hcrepo's one context statement sets it, transaction-locally."""
    conn.execute(
        "SELECT set_config('app.clinic_id', %s, true), set_config('app.actor_id', %s, true),"
        " set_config('app.role', %s, true), set_config('app.emergency_reason', %s, true),"
        " set_config('app.emergency_access_id', %s, true)",
        [str(clinic), "" if actor is None else str(actor), role or "", reason, access],
    )


def _allowed(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> bool:
    """Whether the statement did its work: a row seen, inserted, changed or deleted."""
    try:
        with conn.transaction():
            cursor = conn.execute(statement, params)
            done = cursor.rowcount > 0
            raise _RollBack(done)
    except _RollBack as outcome:
        return outcome.done
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectNotInPrerequisiteState):
        # The second: a view PostgreSQL cannot write through (patient_records), refused
        # before its privileges (none for writing) are looked at.
        return False


class _RollBack(Exception):
    def __init__(self, done: bool) -> None:
        super().__init__()
        self.done = done


def _params(staff: StaffClinic) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    return {
        "clinic": staff.id, "doctor": staff.members["doctor"], "outsider": staff.outsider,
        "provider": staff.provider_id, "patient": staff.patient_id,
        "appointment": staff.appointment_id, "signed": staff.signed_encounter_id,
        "prescription": staff.prescription_id, "email": f"m-{tag}@example.invalid",
        "mrn": f"m-{tag}",
    }


@pytest.mark.parametrize(("table", "operation", "role"), CELLS)
def test_role_matrix_cell(table: str, operation: str, role: str, staff: StaffClinic,
                          app_conn: psycopg.Connection[Any]) -> None:
    with app_conn.transaction():
        if role == CLINIC_LEVEL:
            _act(app_conn, staff.id, None, None)
        else:
            _act(app_conn, staff.id, staff.members[role], role)
        allowed = _allowed(app_conn, STATEMENTS[table][operation], _params(staff))
    assert allowed == (role in MATRIX[table][operation]), (
        f"{role} {operation} on {table}: {'allowed' if allowed else 'refused'}")


@pytest.mark.parametrize("role", ROLES)
def test_the_membership_role_applies_when_none_is_claimed(
    role: str, staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    """No app.role: the actor's membership role decides, cell for cell as when claimed."""
    for table in MATRIX:
        for operation in OPERATIONS:
            with app_conn.transaction():
                _act(app_conn, staff.id, staff.members[role], None)
                allowed = _allowed(app_conn, STATEMENTS[table][operation], _params(staff))
            assert allowed == (role in MATRIX[table][operation]), (role, operation, table)


def test_every_reachable_table_has_a_row_in_the_matrix(
    migrated_db: Database,
) -> None:
    with psycopg.connect(migrated_db.superuser_url) as conn:
        rows = conn.execute(_REACHABLE_SQL).fetchall()
    healthcare = {name for schema, name, tenant, reachable, _ in rows
                  if schema == "public" and (tenant or reachable)}
    assert healthcare == set(MATRIX)
    assert set(STATEMENTS) == set(MATRIX)
    # Elsewhere (the audit schema) hcrepo_app may at most append to a table with a clinic_id
    # (the access log): it reads, changes and removes nothing there.
    assert [(schema, name) for schema, name, tenant, _, beyond_insert in rows
            if schema != "public" and tenant and beyond_insert] == []


@pytest.mark.parametrize("claimed", ["doctor", "nurse", "admin"])
def test_a_role_the_actor_does_not_hold_is_refused(
    claimed: str, staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    """A receptionist claiming a clinician's or an admin's role is refused by the database,
    not shown fewer rows; so is a doctor of another clinic claiming to be one here."""
    for actor in (staff.members["receptionist"], staff.outsider):
        with pytest.raises(psycopg.errors.InsufficientPrivilege,
                           match=r"does not hold the claimed staff role \(app.role\)"), \
                app_conn.transaction():
            _act(app_conn, staff.id, actor, claimed)
            app_conn.execute("SELECT count(*) FROM patients")


def test_an_actor_without_a_membership_sees_no_clinical_rows(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    for actor in (staff.outsider, uuid.uuid4()):
        with app_conn.transaction():
            _act(app_conn, staff.id, actor, None)
            for table in MATRIX:
                if table != "clinics" and MATRIX[table]["SELECT"]:  # else no grant at all
                    count = app_conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                    assert count == (0,), table


def test_a_role_claimed_without_an_actor_is_refused(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="without an actor"):
        _act(app_conn, staff.id, None, "doctor")
        app_conn.execute("SELECT count(*) FROM patients")


def test_a_removed_membership_takes_the_role_away(
    migrated_db: Database, app_conn: psycopg.Connection[Any]
) -> None:
    staff = staff_clinic(migrated_db.superuser_url)
    nurse = staff.members["nurse"]
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        conn.execute("DELETE FROM clinic_memberships WHERE user_id = %s", [nurse])
    _act(app_conn, staff.id, nurse, None)
    assert app_conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)


def test_a_draft_note_is_its_authors(staff: StaffClinic,
                                     app_conn: psycopg.Connection[Any]) -> None:
    """The doctor who wrote a draft reads it; the nurse reads only signed notes."""
    seen = {}
    for role in ("doctor", "nurse"):
        with app_conn.transaction():
            _act(app_conn, staff.id, staff.members[role], role)
            rows = app_conn.execute("SELECT id FROM encounters WHERE patient_id = %s",
                                    [staff.patient_id]).fetchall()
        seen[role] = {row[0] for row in rows}
    assert seen["doctor"] == {staff.signed_encounter_id, staff.draft_encounter_id}
    assert seen["nurse"] == {staff.signed_encounter_id}


def test_staff_management_goes_through_an_admin(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    email = f"onboard-{uuid.uuid4().hex[:10]}@example.invalid"
    onboard = "SELECT id FROM onboard_staff(%s, 'New Nurse', 'nurse')"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admins"), \
            app_conn.transaction():
        _act(app_conn, staff.id, staff.members["doctor"], None)
        app_conn.execute(onboard, [email])
    with app_conn.transaction():
        _act(app_conn, staff.id, staff.members["admin"], None)
        assert app_conn.execute(onboard, [email]).fetchone() is not None


def test_the_policies_evaluate_the_role_once_per_statement(
    migrated_db: Database, staff: StaffClinic
) -> None:
    """`(SELECT hcrepo_scope_role())` is an InitPlan: one membership look-up per statement,
    however many rows the statement reads (counted by PostgreSQL's function statistics)."""
    with psycopg.connect(migrated_db.superuser_url) as conn:
        for n in range(5):
            conn.execute(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
                " VALUES (%s, %s, 'Once', 'Per', '2000-01-01', 'unknown')",
                [staff.id, f"once-{uuid.uuid4().hex[:8]}-{n}"])
        conn.execute("SET LOCAL track_functions = 'all'")
        conn.execute("SET LOCAL ROLE hcrepo_app")
        _act(conn, staff.id, staff.members["doctor"], None)
        rows = conn.execute("SELECT id FROM patients").fetchall()
        conn.execute("RESET ROLE")
        calls = conn.execute(
            "SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'hcrepo_scope_role'"
        ).fetchone()
        conn.rollback()
    assert len(rows) == 6
    assert calls == (1,)


def test_the_role_functions_need_no_search_path_of_their_own(migrated_db: Database) -> None:
    """hcrepo_scope_role(), hcrepo_staff_role() and hcrepo_emergency() run as their owner
    without a SET search_path (migrations/0007 says why): that is safe only while the roles
    that call them can create objects nowhere, so a search_path they set reaches nothing of
    theirs."""
    with psycopg.connect(migrated_db.superuser_url) as conn:
        rows = conn.execute(
            "SELECT n.nspname FROM pg_namespace n"
            " WHERE has_schema_privilege('hcrepo_app', n.oid, 'CREATE')").fetchall()
        database = conn.execute(
            "SELECT has_database_privilege('hcrepo_app', current_database(), 'CREATE'),"
            " has_database_privilege('hcrepo_app', current_database(), 'TEMPORARY')").fetchone()
        functions = conn.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig, p.proowner::regrole::text,"
            " has_function_privilege('public', p.oid, 'EXECUTE')"
            " FROM pg_proc p WHERE p.proname IN"
            " ('hcrepo_scope_role', 'hcrepo_staff_role', 'hcrepo_emergency') ORDER BY 1"
        ).fetchall()
    assert rows == [] and database == (False, False)
    assert functions == [(name, True, None, "hcrepo_owner", False) for name in (
        "hcrepo_emergency", "hcrepo_scope_role", "hcrepo_staff_role")]
