"""The write-audit trail in PostgreSQL: every write path of the healthcare repositories
leaves exactly the expected audit rows, secrets never in clear, the actor required by the
database itself, and the audit tables append-only for the application and the owner."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import errors

from hcrepo import Database, Settings
from hcrepo.healthcare import (
    AppointmentRepository,
    EncounterRepository,
    PatientRepository,
    PrescriptionRepository,
)
from hcrepo.testing import PgBouncer, PostgresServer
from tests.plugins.database import APP_PASSWORD, FreshDatabase, bootstrap_database, migrate_database
from tests.plugins.database import Database as ServerDatabase
from tests.support.audit import changes_after, last_change_id
from tests.support.keys import new_key
from tests.support.repos import AuditWrites, Clinic, new_clinic

PATIENT_COLUMNS = ["id", "clinic_id", "mrn", "first_name", "last_name", "date_of_birth", "sex",
                   "phone", "email", "address", "ssn", "created_at", "updated_at", "ssn_bidx"]
NINE = datetime(2031, 3, 4, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=4,
                        audit_sealer=False, master_key=new_key(), blind_index_key=new_key())
    with Database(settings) as database:
        yield database


@pytest.fixture
def clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, patients=1)


class Trail:
    """The audit rows one clinic gained since the last call."""

    def __init__(self, url: str, clinic: Clinic) -> None:
        self.url, self.clinic, self.mark = url, clinic, last_change_id(url)

    def new(self) -> list[dict[str, Any]]:
        rows = changes_after(self.url, self.clinic.id, self.mark)
        if rows:
            self.mark = rows[-1]["id"]
        return rows


@pytest.fixture
def trail(migrated_db: ServerDatabase, clinic: Clinic) -> Trail:
    return Trail(migrated_db.superuser_url, clinic)


def _one(rows: list[dict[str, Any]], action: str, table: str, row_id: object,
         actor: UUID) -> dict[str, Any]:
    assert [(r["action"], r["table_name"], r["row_id"]) for r in rows] == [
        (action, table, str(row_id))]
    row = rows[0]
    assert row["actor_id"] == actor
    assert row["db_role"] == "hcrepo_app"
    return row


def test_patient_create_update_rename_and_secret_columns(
    db: Database, clinic: Clinic, trail: Trail
) -> None:
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        patient = PatientRepository(db).create(
            mrn=uuid.uuid4().hex[:10], first_name="Jane", last_name="Doe",
            date_of_birth=date(1980, 5, 17), sex="female", phone="+1 555 0100",
            ssn="123-45-6789")
        created = _one(trail.new(), "INSERT", "patients", patient.id, clinic.actor_id)
        assert created["changed"] == PATIENT_COLUMNS
        assert created["patient_id"] == patient.id and created["old"] is None
        assert created["new"]["first_name"] == "Jane" and created["new"]["phone"] == "+1 555 0100"
        assert created["new"]["ssn"] == created["new"]["ssn_bidx"] == "[secret]"

        assert PatientRepository(db).update_contact(
            id=patient.id, phone="+1 555 0199", email=None, address="1 Main St") == 1
        updated = _one(trail.new(), "UPDATE", "patients", patient.id, clinic.actor_id)
        assert updated["changed"] == ["address", "phone", "updated_at"]
        assert updated["old"]["phone"] == "+1 555 0100" and updated["new"]["phone"] == "+1 555 0199"
        assert updated["old"]["address"] is None and updated["new"]["address"] == "1 Main St"
        assert set(updated["old"]) == set(updated["new"]) == set(updated["changed"])

        assert PatientRepository(db).rename(id=patient.id, first_name="Janet", last_name="Doe") == 1
        renamed = _one(trail.new(), "UPDATE", "patients", patient.id, clinic.actor_id)
        assert renamed["changed"] == ["first_name", "updated_at"]
        assert (renamed["old"]["first_name"], renamed["new"]["first_name"]) == ("Jane", "Janet")

        with db.unit_of_work() as uow:
            assert PatientRepository(uow).set_ssn(id=patient.id, ssn="987-65-4321") == 1
        secret = _one(trail.new(), "UPDATE", "patients", patient.id, clinic.actor_id)
        assert secret["changed"] == ["ssn", "ssn_bidx", "updated_at"]
        assert secret["old"]["ssn"] == secret["new"]["ssn"] == "[secret]"
        assert secret["old"]["ssn_bidx"] == secret["new"]["ssn_bidx"] == "[secret]"
        with db.unit_of_work() as uow:
            PatientRepository(uow).set_ssn(id=patient.id, ssn=None)
        cleared = trail.new()[0]
        # Not even whether a secret is empty reaches the trail.
        assert (cleared["old"]["ssn"], cleared["new"]["ssn"]) == ("[secret]", "[secret]")
    with psycopg.connect(trail.url) as conn:
        found = conn.execute("SELECT count(*) FROM audit.changes WHERE old::text LIKE %s "
                             "OR new::text LIKE %s", ["%45-6789%", "%65-4321%"]).fetchone()
    assert found == (0,)


def test_appointment_book_cancel_reschedule_status(
    db: Database, clinic: Clinic, trail: Trail
) -> None:
    patient, provider = clinic.patient_ids[0], clinic.provider_ids[0]
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        repo = AppointmentRepository(db)
        booked = repo.book(patient_id=patient, provider_id=provider, starts_at=NINE,
                           ends_at=NINE + timedelta(minutes=30), reason="checkup")
        row = _one(trail.new(), "INSERT", "appointments", booked.id, clinic.actor_id)
        assert row["patient_id"] == patient and row["new"]["reason"] == "checkup"

        later = NINE + timedelta(hours=2)
        assert repo.reschedule(id=booked.id, starts_at=later,
                               ends_at=later + timedelta(minutes=30)) is not None
        row = _one(trail.new(), "UPDATE", "appointments", booked.id, clinic.actor_id)
        assert row["changed"] == ["ends_at", "starts_at", "updated_at"]

        assert repo.set_status(id=booked.id, status="checked_in") == 1
        row = _one(trail.new(), "UPDATE", "appointments", booked.id, clinic.actor_id)
        assert row["changed"] == ["status", "updated_at"]
        assert (row["old"]["status"], row["new"]["status"]) == ("scheduled", "checked_in")

        assert repo.cancel(id=booked.id) == 1
        row = _one(trail.new(), "UPDATE", "appointments", booked.id, clinic.actor_id)
        assert (row["old"]["status"], row["new"]["status"]) == ("checked_in", "cancelled")
        # A write that changes no row leaves no audit row.
        assert repo.cancel(id=booked.id) == 0
        assert trail.new() == []


def test_encounter_record_amend_sign_and_prescription_paths(
    db: Database, clinic: Clinic, trail: Trail
) -> None:
    patient, provider = clinic.patient_ids[0], clinic.provider_ids[0]
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        encounters = EncounterRepository(db)
        encounter = encounters.record(patient_id=patient, provider_id=provider,
                                      occurred_at=NINE, note="first", diagnosis_codes=["J00"])
        row = _one(trail.new(), "INSERT", "encounters", encounter.id, clinic.actor_id)
        assert row["new"]["diagnosis_codes"] == ["J00"] and row["patient_id"] == patient
        assert encounters.amend_note(id=encounter.id, note="second") == 1
        row = _one(trail.new(), "UPDATE", "encounters", encounter.id, clinic.actor_id)
        assert (row["changed"], row["old"], row["new"]) == (
            ["note"], {"note": "first"}, {"note": "second"})
        assert encounters.sign(id=encounter.id) is not None
        row = _one(trail.new(), "UPDATE", "encounters", encounter.id, clinic.actor_id)
        assert row["changed"] == ["signed_at"] and row["old"] == {"signed_at": None}

        prescriptions = PrescriptionRepository(db)
        rx = prescriptions.prescribe(patient_id=patient, prescriber_id=provider,
                                     drug_name="Amoxicillin", dosage="500 mg",
                                     frequency="tid", quantity=21, refills=1,
                                     encounter_id=encounter.id)
        row = _one(trail.new(), "INSERT", "prescriptions", rx.id, clinic.actor_id)
        assert row["new"]["drug_name"] == "Amoxicillin"
        assert prescriptions.use_refill(id=rx.id) == 0
        row = _one(trail.new(), "UPDATE", "prescriptions", rx.id, clinic.actor_id)
        assert (row["changed"], row["old"], row["new"]) == (
            ["refills"], {"refills": 1}, {"refills": 0})
        assert prescriptions.set_status(id=rx.id, status="completed") == 1
        row = _one(trail.new(), "UPDATE", "prescriptions", rx.id, clinic.actor_id)
        assert (row["old"], row["new"]) == ({"status": "active"}, {"status": "completed"})


def test_rows_of_one_transaction_share_its_txid_and_a_rollback_leaves_none(
    db: Database, clinic: Clinic, trail: Trail
) -> None:
    patient = clinic.patient_ids[0]
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        with db.unit_of_work() as uow:
            PatientRepository(uow).rename(id=patient, first_name="A", last_name="B")
            PatientRepository(uow).rename(id=patient, first_name="C", last_name="D")
        rows = trail.new()
        assert len(rows) == 2 and rows[0]["txid"] == rows[1]["txid"]
        with pytest.raises(RuntimeError), db.unit_of_work() as uow:
            PatientRepository(uow).rename(id=patient, first_name="E", last_name="F")
            raise RuntimeError("abandon the unit")
        assert trail.new() == []


def test_a_bulk_insert_select_is_audited_by_one_trigger_call(
    fresh_database: FreshDatabase,
) -> None:
    server = fresh_database()
    migrate_database(server)
    with psycopg.connect(server.superuser_url, autocommit=True) as conn:
        # pg_stat_xact_user_functions counts calls only with track_functions on (superuser).
        conn.execute(f'ALTER DATABASE "{server.dbname}" SET track_functions = pl')
    clinic = new_clinic(server.superuser_url, patients=0)
    count = 200_000
    settings = Settings(database_url=server.app_url, redis_url="", pool_min=1, pool_max=2,
                        audit_sealer=False)
    with (Database(settings) as db,
          db.context(clinic_id=clinic.id, actor_id=clinic.actor_id),
          db.unit_of_work() as uow):
        assert AuditWrites(uow).bulk_patients(prefix="bulk-", count=count) == count
        assert AuditWrites(uow).audit_trigger_calls() == 1
    with psycopg.connect(server.superuser_url) as conn:
        found = conn.execute(
            "SELECT count(*), count(DISTINCT row_id), count(DISTINCT txid::text), "
            "bool_and(actor_id = %s AND action = 'INSERT' AND patient_id::text = row_id) "
            "FROM audit.changes WHERE clinic_id = %s", [clinic.actor_id, clinic.id],
        ).fetchone()
    assert found == (count, count, 1, True)


def test_a_write_through_pgbouncer_is_audited_with_its_actor(
    pg_primary: PostgresServer, migrated_db: ServerDatabase, clinic: Clinic, trail: Trail
) -> None:
    other = new_clinic(migrated_db.superuser_url, patients=1)
    other_trail = Trail(migrated_db.superuser_url, other)
    with PgBouncer(pg_primary, dbname=migrated_db.dbname, users={"hcrepo_app": APP_PASSWORD},
                   pool_size=1) as bouncer:
        settings = Settings(database_url=bouncer.url(user="hcrepo_app"), redis_url="",
                            pool_min=1, pool_max=2, prepared_statements=False)
        with Database(settings) as db:
            # Two clinics, two actors, one server session: each row carries its own.
            for tenant in (clinic, other, clinic):
                with db.context(clinic_id=tenant.id, actor_id=tenant.actor_id):
                    PatientRepository(db).rename(id=tenant.patient_ids[0], first_name="Pg",
                                                 last_name=tenant.id.hex[:6])
    rows = trail.new()
    assert [(r["action"], r["actor_id"]) for r in rows] == [("UPDATE", clinic.actor_id)] * 2
    assert [(r["action"], r["actor_id"]) for r in other_trail.new()] == [
        ("UPDATE", other.actor_id)]


@pytest.mark.parametrize("actor", [None, ""])
def test_a_write_without_an_actor_fails_in_the_database(
    fresh_database: FreshDatabase, actor: str | None
) -> None:
    """The staff role rules already keep a context with no actor from writing clinical rows
    (it reads as the front desk); the audit trigger refuses on its own as well, shown on a
    PHI table a later migration adds with no role policies."""
    server = fresh_database()
    migrate_database(server)
    clinic = new_clinic(server.superuser_url, patients=1)
    with psycopg.connect(server.owner_url) as conn:
        conn.execute("CREATE TABLE referrals (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                     " clinic_id uuid NOT NULL, patient_id uuid NOT NULL, note text)")
        conn.execute("GRANT SELECT, INSERT, UPDATE ON referrals TO hcrepo_app")
        conn.execute("SELECT audit.enable('referrals')")
        conn.execute("INSERT INTO referrals (clinic_id, patient_id) VALUES (%s, %s)",
                     [clinic.id, clinic.patient_ids[0]])
    mark = last_change_id(server.superuser_url)

    def without_actor(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT set_config('app.clinic_id', %s, true)", [str(clinic.id)])
        if actor is not None:
            conn.execute("SELECT set_config('app.actor_id', %s, true)", [actor])

    with psycopg.connect(server.app_url) as conn:
        without_actor(conn)
        assert conn.execute("UPDATE patients SET phone = 'x' WHERE id = %s",
                            [clinic.patient_ids[0]]).rowcount == 0
        conn.rollback()
        for statement in ("UPDATE referrals SET note = 'x'",
                          f"INSERT INTO referrals (clinic_id, patient_id) VALUES "
                          f"('{clinic.id}', '{clinic.patient_ids[0]}')"):
            without_actor(conn)
            with pytest.raises(errors.InsufficientPrivilege, match="needs an actor"):
                conn.execute(statement)
            conn.rollback()
        # A statement that changes no row writes nothing and needs no actor.
        without_actor(conn)
        assert conn.execute("UPDATE referrals SET note = 'x' WHERE false").rowcount == 0
    assert changes_after(server.superuser_url, clinic.id, mark) == []


_MUTATIONS = [
    "INSERT INTO audit.changes (clinic_id, action, table_name) VALUES "
    "('00000000-0000-0000-0000-000000000001', 'INSERT', 'patients')",
    "UPDATE audit.changes SET actor_id = NULL",
    "DELETE FROM audit.changes",
    "TRUNCATE audit.changes",
    "INSERT INTO audit.chain VALUES ('00000000-0000-0000-0000-000000000001', 1, 1, now(), "
    "'\\x00', '\\x00')",
    "UPDATE audit.chain SET hash = '\\x00'",
    "DELETE FROM audit.access_log",
    "UPDATE audit.access_log SET query = 'x'",
    "TRUNCATE audit.access_log",
    "SELECT count(*) FROM audit.changes",
    "SELECT count(*) FROM audit.access_log",
    "UPDATE audit.seal_state SET horizon = 1",
    "SELECT audit.log_auditor('forged', '{}')",
]


@pytest.mark.parametrize("statement", _MUTATIONS)
def test_the_application_role_cannot_touch_the_audit_tables(
    migrated_db: ServerDatabase, statement: str
) -> None:
    with psycopg.connect(migrated_db.app_url) as conn, pytest.raises(
            errors.InsufficientPrivilege):
        conn.execute(statement)


def test_the_application_role_may_only_insert_into_the_access_log(
    migrated_db: ServerDatabase, clinic: Clinic
) -> None:
    with psycopg.connect(migrated_db.app_url) as conn:
        for recorded in ("1901-03-04", "2026-06-01", "2301-01-01"):  # any month: never fails
            conn.execute(
                "INSERT INTO audit.access_log (recorded_at, actor_id, clinic_id, query, "
                "patient_ids, source) VALUES (%s, %s, %s, 'PatientRepository.get', %s, "
                "'primary')", [recorded, clinic.actor_id, clinic.id, [clinic.patient_ids[0]]])
        with conn.cursor() as cursor, cursor.copy(
                "COPY audit.access_log (recorded_at, clinic_id, query, patient_ids, source) "
                "FROM STDIN") as copy:
            copy.write_row([datetime.now(UTC), clinic.id, "PatientRepository.search",
                            [clinic.patient_ids[0]], "cache"])


# A row of each table, inserted as the owner in the test's transaction: row triggers fire
# only for rows that are there.
_OWNER_ROWS = {
    "audit.changes": "INSERT INTO audit.changes (clinic_id, action, table_name) VALUES "
                     "(gen_random_uuid(), 'INSERT', 'patients')",
    "audit.chain": "INSERT INTO audit.chain VALUES (gen_random_uuid(), 1, 0, now(), '\\x00', "
                   "'\\x00')",
    "audit.access_log": "INSERT INTO audit.access_log (recorded_at, clinic_id, query, "
                        "patient_ids, source) "
                        "VALUES (now(), gen_random_uuid(), 'q', '{}', 'cache')",
    "audit.purges": "INSERT INTO audit.purges (table_name, partition, rows, change_id) "
                    "VALUES ('t', 'p', 0, 0)",
    "audit.auditor_log": "INSERT INTO audit.auditor_log (command) VALUES ('c')",
}


@pytest.mark.parametrize(("table", "statement"), [
    ("audit.changes", "UPDATE audit.changes SET actor_id = NULL"),
    ("audit.changes", "DELETE FROM audit.changes"),
    ("audit.changes", "TRUNCATE audit.changes"),
    ("audit.chain", "UPDATE audit.chain SET hash = '\\x00'"),
    ("audit.chain", "DELETE FROM audit.chain"),
    ("audit.access_log", "DELETE FROM audit.access_log"),
    ("audit.access_log", "TRUNCATE audit.access_log"),
    ("audit.purges", "DELETE FROM audit.purges"),
    ("audit.auditor_log", "UPDATE audit.auditor_log SET command = 'x'"),
])
def test_the_owner_cannot_change_or_remove_audit_rows(
    migrated_db: ServerDatabase, table: str, statement: str
) -> None:
    with psycopg.connect(migrated_db.owner_url) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)
        conn.rollback()
        # Granting itself the privilege back does not help: the append-only triggers refuse.
        conn.execute(f"GRANT UPDATE, DELETE, TRUNCATE ON {table} TO hcrepo_owner")
        conn.execute(_OWNER_ROWS[table])
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)
        conn.rollback()


def test_the_owner_cannot_truncate_a_partition_directly(migrated_db: ServerDatabase) -> None:
    with psycopg.connect(migrated_db.owner_url) as conn:
        partition = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'audit.changes'::regclass AND c.relkind = 'r' "
            "ORDER BY c.relname DESC LIMIT 1").fetchone()
        assert partition is not None
        conn.execute(f"GRANT TRUNCATE ON audit.{partition[0]} TO hcrepo_owner")
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute(f"TRUNCATE audit.{partition[0]}")


def test_a_later_migration_marks_a_table_and_its_secret_columns_with_one_call(
    fresh_database: FreshDatabase,
) -> None:
    server = fresh_database()
    migrate_database(server)
    clinic = new_clinic(server.superuser_url, patients=1)
    with psycopg.connect(server.owner_url) as conn:
        conn.execute("ALTER TABLE patients ADD COLUMN insurance_number text")
        conn.execute("SELECT audit.enable('patients', ARRAY['insurance_number'], 'id')")
        assert conn.execute("SELECT secrets FROM audit.tables WHERE relid = 'patients'::regclass"
                            ).fetchone() == (["insurance_number", "ssn", "ssn_bidx"],)
        conn.commit()
        with pytest.raises(errors.RaiseException, match="has no column"):
            conn.execute("SELECT audit.enable('patients', ARRAY['nope'], 'id')")
    mark = last_change_id(server.superuser_url)
    with psycopg.connect(server.app_url) as conn:
        conn.execute("SELECT set_config('app.clinic_id', %s, true), "
                     "set_config('app.actor_id', %s, true)", [str(clinic.id), str(clinic.actor_id)])
        conn.execute("UPDATE patients SET insurance_number = 'abc', phone = '1' WHERE id = %s",
                     [clinic.patient_ids[0]])
    [row] = changes_after(server.superuser_url, clinic.id, mark)
    assert row["changed"] == ["insurance_number", "phone", "updated_at"]
    assert row["new"]["insurance_number"] == "[secret]" and row["new"]["phone"] == "1"


@pytest.mark.parametrize("claimed", ["doctor", ""])
def test_the_staff_role_in_force_is_recorded(migrated_db: ServerDatabase, clinic: Clinic,
                                             trail: Trail, claimed: str) -> None:
    """Claimed or not, the change records the role the actor holds in the clinic (the
    clinic's actor is a doctor member)."""
    with psycopg.connect(migrated_db.app_url) as conn:
        conn.execute("SELECT set_config('app.clinic_id', %s, true), "
                     "set_config('app.actor_id', %s, true), set_config('app.role', %s, true)",
                     [str(clinic.id), str(clinic.actor_id), claimed])
        conn.execute("UPDATE patients SET phone = 'n' WHERE id = %s", [clinic.patient_ids[0]])
    assert [r["staff_role"] for r in trail.new()] == ["doctor"]


def test_bootstrapped_databases_share_the_auditor(pg_primary: PostgresServer) -> None:
    # A second database in the same cluster migrates with the auditor role already there.
    server = bootstrap_database(pg_primary, f"audit_{uuid.uuid4().hex[:8]}")
    try:
        migrate_database(server)
    finally:
        with psycopg.connect(pg_primary.superuser_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{server.dbname}" WITH (FORCE)')


def test_an_audited_rows_primary_key_never_changes(migrated_db: ServerDatabase, clinic: Clinic,
                                                   trail: Trail) -> None:
    """The trail pairs old and new versions by the key: a change of key is refused (even to
    a superuser), so no update can leave the trail without its pair."""
    with psycopg.connect(migrated_db.superuser_url) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="never changes"):
            conn.execute("UPDATE patients SET id = gen_random_uuid() WHERE id = %s",
                         [clinic.patient_ids[0]])
        conn.rollback()
        # Naming the key without changing it is an ordinary update.
        assert conn.execute("UPDATE patients SET id = id, phone = 'k' WHERE id = %s",
                            [clinic.patient_ids[0]]).rowcount == 1
    [row] = trail.new()
    assert row["changed"] == ["phone", "updated_at"]
