"""The staff role and break-glass through hcrepo: where the context takes them, what the
cache keys by, how a break-glass is recorded and what the database accepts as one."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest

from hcrepo import (
    Database,
    EmergencyAccess,
    InvalidContext,
    Repository,
    RowSecurityViolation,
    Settings,
    bind_context,
    cached,
    query,
)
from hcrepo.healthcare import EncounterRepository, PatientRepository
from hcrepo.testing import PostgresServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import WaitReplayed
from tests.support.cache import CachedDatabase, until
from tests.support.staff import StaffClinic, staff_clinic

REASON = "patient unresponsive in the waiting room"


class RolesRepo(Repository, sql="sql/roles.sql"):
    # independent_of the actor: the riskiest declaration a list of notes can make.
    @query("roles_encounter_ids", phi=True)
    @cached(ttl=60, independent_of=("actor_id",))
    def encounter_ids(self, *, patient_id: UUID) -> list[UUID]: ...


@pytest.fixture
def staff(migrated_db: ServerDatabase) -> StaffClinic:
    return staff_clinic(migrated_db.superuser_url)


@pytest.fixture
def alerts() -> list[EmergencyAccess]:
    return []


@pytest.fixture
def db(migrated_db: ServerDatabase, alerts: list[EmergencyAccess]) -> Iterator[Database]:
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=4)
    with Database(settings, on_emergency_access=alerts.append) as database:
        yield database


def _recorded(migrated_db: ServerDatabase, actor: UUID) -> list[tuple[Any, ...]]:
    with psycopg.connect(migrated_db.superuser_url) as conn:
        return conn.execute(
            "SELECT id, clinic_id, role, reason FROM audit.emergency_access WHERE actor_id = %s"
            " ORDER BY recorded_at", [actor]).fetchall()


# --- the role in the context ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["Doctor", "doctor ", "auditor", "", "superuser", 1])
def test_a_bad_role_is_refused_where_it_is_written(db: Database, role: Any) -> None:
    clinic = uuid.uuid4()
    with pytest.raises(InvalidContext, match="role must be one of"):
        db.context(clinic_id=clinic, role=role)
    with pytest.raises(InvalidContext, match="role must be one of"):
        db.unit_of_work(clinic_id=clinic, role=role)
    with pytest.raises(InvalidContext, match="role must be one of"):
        PatientRepository(db, role=role)
    with pytest.raises(InvalidContext, match="role must be one of"):
        db.transaction(lambda uow: None, clinic_id=clinic, role=role)


def test_a_receptionist_is_refused_clinical_notes(db: Database, staff: StaffClinic) -> None:
    receptionist = staff.members["receptionist"]
    with db.context(clinic_id=staff.id, actor_id=receptionist, role="receptionist"):
        assert PatientRepository(db).get(id=staff.patient_id) is not None
        assert EncounterRepository(db).get(id=staff.signed_encounter_id) is None
        assert EncounterRepository(db).for_patient(patient_id=staff.patient_id) == []
    with db.context(clinic_id=staff.id, actor_id=receptionist):  # the membership role
        assert EncounterRepository(db).get(id=staff.signed_encounter_id) is None
    with db.context(clinic_id=staff.id, actor_id=staff.members["nurse"]):
        assert EncounterRepository(db).get(id=staff.signed_encounter_id) is not None


def test_a_claimed_role_the_actor_does_not_hold_is_refused(
    db: Database, staff: StaffClinic
) -> None:
    with db.context(clinic_id=staff.id, actor_id=staff.members["receptionist"], role="doctor"):
        with pytest.raises(RowSecurityViolation, match="does not hold the claimed staff role"):
            EncounterRepository(db).get(id=staff.signed_encounter_id)
        with pytest.raises(RowSecurityViolation), db.unit_of_work() as uow:
            EncounterRepository(uow).get(id=staff.signed_encounter_id)


def test_the_role_travels_with_overrides_units_and_threads(
    db: Database, staff: StaffClinic
) -> None:
    nurse = staff.members["nurse"]
    with db.context(clinic_id=staff.id, actor_id=nurse):
        # An override claiming a role the nurse does not hold reaches the database.
        with pytest.raises(RowSecurityViolation):
            PatientRepository(db, role="doctor").get(id=staff.patient_id)
        assert PatientRepository(db, role="nurse").get(id=staff.patient_id) is not None
    with db.context(clinic_id=staff.id, actor_id=nurse, role="nurse"):
        with db.unit_of_work() as uow:
            assert uow.context.role == "nurse"
            with pytest.raises(InvalidContext, match="another role"):
                db.transaction(lambda inner: None, role="receptionist")
            with pytest.raises(InvalidContext, match="role it was opened with"):
                PatientRepository(uow, role="receptionist")
            assert db.transaction(lambda inner: inner is uow, role="nurse")
        seen: list[object] = []
        worker = threading.Thread(target=bind_context(
            lambda: seen.append(EncounterRepository(db).get(id=staff.signed_encounter_id))))
        worker.start()
        worker.join(timeout=30)
        assert seen and seen[0] is not None


def test_a_doctors_cached_notes_are_never_served_to_a_receptionist(
    cached_db: CachedDatabase, staff: StaffClinic
) -> None:
    db = cached_db()
    doctor, receptionist = staff.members["doctor"], staff.members["receptionist"]
    notes = {staff.signed_encounter_id, staff.draft_encounter_id}
    with db.context(clinic_id=staff.id, actor_id=doctor):
        assert set(RolesRepo(db).encounter_ids(patient_id=staff.patient_id)) == notes
        assert set(RolesRepo(db).encounter_ids(patient_id=staff.patient_id)) == notes  # a hit
        assert EncounterRepository(db).get(id=staff.signed_encounter_id) is not None
    for role in ("receptionist", None):  # claimed, or the membership role
        with db.context(clinic_id=staff.id, actor_id=receptionist, role=role):
            assert RolesRepo(db).encounter_ids(patient_id=staff.patient_id) == []
            assert EncounterRepository(db).get(id=staff.signed_encounter_id) is None
    with db.context(clinic_id=staff.id, actor_id=staff.members["nurse"], role="nurse"):
        assert RolesRepo(db).encounter_ids(patient_id=staff.patient_id) == [
            staff.signed_encounter_id]


# --- break-glass ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["nurse", None])
def test_break_glass_widens_a_clinicians_reads_and_is_recorded(
    db: Database, staff: StaffClinic, alerts: list[EmergencyAccess],
    migrated_db: ServerDatabase, role: str | None,
) -> None:
    nurse = staff.members["nurse"]
    with db.context(clinic_id=staff.id, actor_id=nurse, role=role):
        assert EncounterRepository(db).get(id=staff.draft_encounter_id) is None
    assert alerts == [] and _recorded(migrated_db, nurse) == []
    with db.context(clinic_id=staff.id, actor_id=nurse, role=role,
                    emergency_reason=f"  {REASON} ") as context:
        assert EncounterRepository(db).get(id=staff.draft_encounter_id) is not None
        notes = EncounterRepository(db).for_patient(patient_id=staff.patient_id)
        assert {note.id for note in notes} == {staff.signed_encounter_id,
                                               staff.draft_encounter_id}
        with db.unit_of_work() as uow:
            assert EncounterRepository(uow).get(id=staff.draft_encounter_id) is not None
    assert alerts == [EmergencyAccess(context.emergency_access_id, staff.id, nurse, "nurse",
                                      REASON)]
    assert REASON not in repr(alerts[0])
    assert _recorded(migrated_db, nurse) == [(context.emergency_access_id, staff.id, "nurse",
                                              REASON)]
    with db.context(clinic_id=staff.id, actor_id=nurse):  # the glass is whole again
        assert EncounterRepository(db).get(id=staff.draft_encounter_id) is None


@pytest.mark.parametrize("reason", ["", "   ", "\n\t", 42, b"why"])
def test_break_glass_without_a_reason_is_refused(
    db: Database, staff: StaffClinic, migrated_db: ServerDatabase, reason: Any
) -> None:
    nurse = staff.members["nurse"]
    with pytest.raises(InvalidContext, match="emergency_reason must say why"):
        db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=reason)
    with pytest.raises(InvalidContext, match="emergency_reason must say why"):
        db.unit_of_work(clinic_id=staff.id, actor_id=nurse, emergency_reason=reason)
    assert _recorded(migrated_db, nurse) == []


def test_break_glass_is_for_clinicians(
    db: Database, staff: StaffClinic, migrated_db: ServerDatabase,
    alerts: list[EmergencyAccess],
) -> None:
    for role in ("receptionist", "admin"):
        member = staff.members[role]
        with pytest.raises(InvalidContext, match="for clinicians"):
            db.context(clinic_id=staff.id, actor_id=member, role=role, emergency_reason=REASON)
        # With no role claimed hcrepo cannot tell: the database refuses to record it.
        block = db.context(clinic_id=staff.id, actor_id=member, emergency_reason=REASON)
        with pytest.raises(RowSecurityViolation, match="for clinicians"), block:
            pytest.fail("the block ran")
        assert _recorded(migrated_db, member) == []
    block = db.context(clinic_id=staff.id, emergency_reason=REASON)
    with pytest.raises(InvalidContext, match="needs a clinic_id and an actor_id"), block:
        pytest.fail("the block ran")
    assert alerts == []


def test_break_glass_stays_with_the_who_it_was_recorded_for(
    db: Database, staff: StaffClinic, alerts: list[EmergencyAccess]
) -> None:
    nurse, doctor = staff.members["nurse"], staff.members["doctor"]
    with db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON) as outer:
        with db.context() as same:
            assert same.emergency_access_id == outer.emergency_access_id
            assert EncounterRepository(db).get(id=staff.draft_encounter_id) is not None
        with db.context(role="nurse") as claimed:
            assert claimed.emergency_access_id is None
        with db.context(actor_id=doctor) as other:
            assert other.emergency_reason is None and other.emergency_access_id is None
        with db.context(emergency_reason=None) as ended:
            assert ended.emergency_access_id is None
            assert EncounterRepository(db).get(id=staff.draft_encounter_id) is None
        seen: list[object] = []
        worker = threading.Thread(target=bind_context(
            lambda: seen.append(EncounterRepository(db).get(id=staff.draft_encounter_id))))
        worker.start()
        worker.join(timeout=30)
        assert seen and seen[0] is not None
    assert len(alerts) == 1


def test_a_failing_alert_hook_refuses_the_block_but_the_use_stays_recorded(
    migrated_db: ServerDatabase, staff: StaffClinic
) -> None:
    def page(access: EmergencyAccess) -> None:
        raise RuntimeError("pager down")

    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=2)
    nurse = staff.members["nurse"]
    with Database(settings, on_emergency_access=page) as db:
        block = db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON)
        with pytest.raises(RuntimeError, match="pager down"), block:
            pytest.fail("the block ran")
    assert len(_recorded(migrated_db, nurse)) == 1


def test_break_glass_reads_never_share_cache_entries(
    cached_db: CachedDatabase, staff: StaffClinic
) -> None:
    db = cached_db()
    nurse = staff.members["nurse"]
    for _ in range(2):
        with db.context(clinic_id=staff.id, actor_id=nurse):
            assert RolesRepo(db).encounter_ids(patient_id=staff.patient_id) == [
                staff.signed_encounter_id]
        with db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON):
            assert len(RolesRepo(db).encounter_ids(patient_id=staff.patient_id)) == 2


# --- what the database accepts as a break-glass --------------------------------------------


@pytest.fixture
def app_conn(migrated_db: ServerDatabase) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db.app_url) as conn:
        yield conn
        conn.rollback()


def _drafts_seen(conn: psycopg.Connection[Any], staff: StaffClinic, actor: UUID, reason: str,
                 access: UUID | str) -> int:
    with conn.transaction():
        conn.execute(
            "SELECT set_config('app.clinic_id', %s, true), set_config('app.actor_id', %s, true),"
            " set_config('app.emergency_reason', %s, true),"
            " set_config('app.emergency_access_id', %s, true)",
            [str(staff.id), str(actor), reason, str(access)])
        row = conn.execute("SELECT count(*) FROM encounters WHERE id = %s",
                           [staff.draft_encounter_id]).fetchone()
    assert row is not None
    return int(row[0])


def test_the_database_refuses_an_unrecorded_break_glass(
    db: Database, staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    nurse, doctor = staff.members["nurse"], staff.members["doctor"]
    assert _drafts_seen(app_conn, staff, nurse, REASON, "") == 0
    assert _drafts_seen(app_conn, staff, nurse, REASON, uuid.uuid4()) == 0
    with db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON) as context:
        recorded = context.emergency_access_id
    assert recorded is not None
    assert _drafts_seen(app_conn, staff, nurse, REASON, recorded) == 1
    assert _drafts_seen(app_conn, staff, nurse, "another reason", recorded) == 0
    other = staff_clinic_member_elsewhere = staff.outsider
    assert _drafts_seen(app_conn, staff, other, REASON, recorded) == 0
    del staff_clinic_member_elsewhere
    # The doctor is a clinician of this clinic too, but the row is the nurse's.
    with app_conn.transaction():
        app_conn.execute("SELECT set_config('app.clinic_id', %s, true),"
                         " set_config('app.actor_id', %s, true)", [str(staff.id), str(doctor)])
        assert app_conn.execute("SELECT hcrepo_emergency()").fetchone() == (False,)


@pytest.mark.parametrize("statement", [
    "SELECT * FROM audit.emergency_access",
    "INSERT INTO audit.emergency_access (clinic_id, actor_id, role, reason)"
    " SELECT clinic_id, actor_id, role, reason FROM audit.emergency_access",
    "UPDATE audit.emergency_access SET reason = 'rewritten'",
    "DELETE FROM audit.emergency_access",
    "TRUNCATE audit.emergency_access",
])
def test_the_emergency_record_is_append_only(
    statement: str, app_conn: psycopg.Connection[Any], migrated_db: ServerDatabase
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_conn.execute(statement)
    if statement.startswith(("UPDATE", "DELETE", "TRUNCATE")):
        with psycopg.connect(migrated_db.owner_url) as owner, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            owner.execute(statement)


def test_recording_needs_a_clinician_a_reason_and_a_context(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    record = "SELECT audit.record_emergency_access(%s)"
    cases = [(None, REASON, "needs a clinic"), (staff.members["receptionist"], REASON,
                                                 "for clinicians"),
             (staff.members["nurse"], "   ", "needs a reason"),
             (staff.outsider, REASON, "for clinicians")]
    for actor, reason, refusal in cases:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=refusal), \
                app_conn.transaction():
            app_conn.execute("SELECT set_config('app.clinic_id', %s, true),"
                             " set_config('app.actor_id', %s, true)",
                             [str(staff.id), "" if actor is None else str(actor)])
            app_conn.execute(record, [reason])


def test_a_break_glass_read_on_a_replica_waits_for_its_record(
    migrated_db: ServerDatabase, staff: StaffClinic, pg_replica: PostgresServer,
    wait_replayed: WaitReplayed,
) -> None:
    """The record is a write on the primary: its position is the block's, so a read that a
    replica would answer without the record (and so without the break-glass) goes where it is
    visible."""
    nurse = staff.members["nurse"]
    wait_replayed(pg_replica)
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=2,
                        read_replica_urls=[migrated_db.replica_app_url(pg_replica)])
    with Database(settings) as db, \
            psycopg.connect(migrated_db.replica_superuser_url(pg_replica),
                            autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            until(lambda: replica.execute("SELECT pg_get_wal_replay_pause_state()")
                  .fetchone() == ("paused",), what="replay to pause")
            with db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON) as ctx:
                assert db.last_write_token() is not None
                assert EncounterRepository(db).get(id=staff.draft_encounter_id) is not None
            with psycopg.connect(migrated_db.replica_app_url(pg_replica)) as conn:
                assert ctx.emergency_access_id is not None
                assert _drafts_seen(conn, staff, nurse, REASON, ctx.emergency_access_id) == 0
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
    wait_replayed(pg_replica)


def test_a_joined_transaction_with_another_break_glass_is_refused(
    db: Database, staff: StaffClinic
) -> None:
    nurse = staff.members["nurse"]
    with db.context(clinic_id=staff.id, actor_id=nurse, emergency_reason=REASON), \
            db.unit_of_work() as uow:
        assert db.transaction(lambda inner: inner is uow)
        with db.context(emergency_reason=None), \
                pytest.raises(InvalidContext, match="another emergency_access_id"):
            db.transaction(lambda inner: None)
