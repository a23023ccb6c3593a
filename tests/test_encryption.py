"""Field encryption against the migrated schema: patients.ssn sealed in the application,
found through its blind index, readable only by the staff roles that may see it (enforced by
PostgreSQL), and surviving key rotations that run while it is read.

The staff role in force is PostgreSQL's to decide (migrations/0007_staff_roles): a claimed
role counts only if the actor holds it in the clinic, so the tests act as real members of
the clinic, never as a role set for a whole session.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import psycopg
import pytest
import redis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel

from hcrepo import (
    ConfigError,
    Database,
    DecryptionFailed,
    Encrypted,
    Repository,
    RowSecurityViolation,
    Settings,
    SqlFileError,
    UniqueViolation,
    query,
)
from hcrepo.admin import migrate, rotation
from hcrepo.cache.codec import ValueCodec, read_header
from hcrepo.crypto import keyring
from hcrepo.crypto.keys import SettingsMasterKeys
from hcrepo.healthcare import Patient, PatientRepository
from hcrepo.sqlfile import Column
from hcrepo.testing import RedisCluster
from tests.plugins.database import APP_PASSWORD, FreshDatabase
from tests.plugins.database import Database as ServerDatabase
from tests.support.cache import ENCRYPTION_KEY, CachedDatabase, Counts, value_keys
from tests.support.cli import assert_one_line, hcrepo
from tests.support.keys import new_key
from tests.support.repos import Clinic, MakeDatabase, new_clinic, staff_member
from tests.support.staff import StaffClinic, staff_clinic

SSN = "123-45-6789"
SSN_COLUMNS = [Column("patients", "ssn")]


MASTER = new_key()
BLIND = new_key()


def keyed(url: str, **overrides: Any) -> Settings:
    """Settings for hcrepo_app at `url` with the test keys (overridable)."""
    options: dict[str, Any] = {"database_url": url, "redis_url": "", "pool_min": 1,
                               "pool_max": 3, "HCREPO_MASTER_KEY": MASTER,
                               "HCREPO_BLIND_INDEX_KEY": BLIND, **overrides}
    return Settings(**options)


@pytest.fixture(scope="module")
def doctor(migrated_db: ServerDatabase) -> Iterator[Database]:
    """The tests' Database as hcrepo_app with the test keys. The role is in each context, not
    in the Database: `scope` acts in it as the clinic's doctor, other tests as other
    members."""
    with Database(keyed(migrated_db.app_url)) as db:
        yield db


@pytest.fixture
def clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, patients=0)


def scope(db: Database, clinic: Clinic) -> AbstractContextManager[object]:
    """As the clinic's doctor (new_clinic's member), claiming the role the doctor holds."""
    return db.context(clinic_id=clinic.id, actor_id=clinic.actor_id, role="doctor")


def create(db: Database, ssn: str | None, mrn: str | None = None) -> Patient:
    return PatientRepository(db).create(
        mrn=mrn or uuid.uuid4().hex[:12], first_name="Crypto", last_name="Tester",
        date_of_birth=date(1980, 5, 6), sex="other", ssn=ssn)


def fake_ssn(n: int) -> str:
    return f"900-{n // 10000 % 100:02d}-{n % 10000:04d}"


def superuser(migrated_db: ServerDatabase) -> psycopg.Connection[Any]:
    return psycopg.connect(migrated_db.superuser_url, autocommit=True)


def stored(migrated_db: ServerDatabase, patient_id: UUID) -> tuple[str | None, bytes | None]:
    with superuser(migrated_db) as conn:
        row = conn.execute("SELECT ssn, ssn_bidx FROM patients WHERE id = %s",
                           [patient_id]).fetchone()
    assert row is not None
    return row[0], row[1]


def owner(migrated_db: ServerDatabase) -> Callable[[], psycopg.Connection[Any]]:
    return lambda: psycopg.connect(migrated_db.owner_url, autocommit=True)


# --- what the database holds -----------------------------------------------------------------


def test_the_database_holds_ciphertext_only(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    with scope(doctor, clinic):
        created = create(doctor, SSN)
        assert created.ssn == SSN
    ssn, bidx = stored(migrated_db, created.id)
    assert ssn is not None and ssn.startswith("hc1:1:") and bidx is not None
    with superuser(migrated_db) as conn:
        everything = " ".join(
            str(row) for table in ("patients", "clinic_data_keys")
            for row in conn.execute(f"SELECT t::text FROM {table} t WHERE clinic_id = %s",
                                    [clinic.id]).fetchall())
        keys = conn.execute("SELECT wrapped FROM clinic_data_keys WHERE clinic_id = %s",
                            [clinic.id]).fetchall()
    assert created.mrn in everything  # the clinic's rows are all there
    for spelling in (SSN, SSN.replace("-", ""), SSN.replace("-", " ")):
        assert spelling not in everything
    assert len(keys) == 1 and len(bytes(keys[0][0])) == 12 + 32 + 16  # nonce, key, tag
    assert len(bidx) == 32 and b"123456789" not in bidx  # an HMAC, not the digits


def test_ssn_round_trips_through_every_read(doctor: Database, clinic: Clinic) -> None:
    with scope(doctor, clinic):
        created = create(doctor, SSN)
        without = create(doctor, None)
        patients = PatientRepository(doctor)
        assert patients.get(id=created.id) == created
        assert patients.by_mrn(mrn=created.mrn) == created
        assert {p.id: p.ssn for p in patients.stream_all()} == {created.id: SSN,
                                                                without.id: None}
        assert patients.set_ssn(id=without.id, ssn="987-65-4321") == 1
        after = patients.get(id=without.id)
        assert after is not None and after.ssn == "987-65-4321"
        assert patients.set_ssn(id=without.id, ssn=None) == 1
        cleared = patients.get(id=without.id)
        assert cleared is not None and cleared.ssn is None


def test_a_unit_of_work_that_rolls_back_keeps_the_clinic_key(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    """The first key of a clinic is committed on its own: a value sealed with it inside a
    unit of work that rolls back must not leave later values sealed with a lost key."""
    with scope(doctor, clinic):
        with pytest.raises(RuntimeError), doctor.unit_of_work() as uow:
            create(uow, SSN)  # type: ignore[arg-type]
            raise RuntimeError("roll back")
        with doctor.unit_of_work() as uow:
            kept = PatientRepository(uow).create(
                mrn="uow-1", first_name="A", last_name="B", date_of_birth=date(1990, 1, 1),
                sex="other", ssn=SSN)
        found = PatientRepository(doctor).get(id=kept.id)
    assert found is not None and found.ssn == SSN
    with superuser(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM clinic_data_keys WHERE clinic_id = %s",
                            [clinic.id]).fetchone() == (1,)


# --- bound to clinic, table, column and row -----------------------------------------------


def test_a_ciphertext_copied_to_another_row_does_not_decrypt(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    with scope(doctor, clinic):
        source = create(doctor, SSN)
        target = create(doctor, None)
    ssn, _ = stored(migrated_db, source.id)
    with superuser(migrated_db) as conn:
        conn.execute("UPDATE patients SET ssn = %s, ssn_bidx = %s WHERE id = %s",
                     [ssn, bytes(32), target.id])
    with scope(doctor, clinic), pytest.raises(DecryptionFailed) as caught:
        PatientRepository(doctor).get(id=target.id)
    message = str(caught.value)
    assert "patients.ssn (get_patient)" in message and "another row or clinic" in message
    assert ssn is not None and ssn not in message and SSN not in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    with scope(doctor, clinic):  # the row it came from still reads
        assert PatientRepository(doctor).get(id=source.id) == source


def test_a_ciphertext_moved_to_another_clinic_does_not_decrypt(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    other = new_clinic(migrated_db.superuser_url, patients=0)
    with scope(doctor, clinic):
        source = create(doctor, SSN)
    with scope(doctor, other):
        create(doctor, "111-11-1111")  # the other clinic has a data key (version 1) too
        target = create(doctor, None)
    ssn, _ = stored(migrated_db, source.id)
    with superuser(migrated_db) as conn:
        # Moved with its row id: only the clinic differs in what the value is bound to.
        conn.execute("UPDATE patients SET ssn = %s, ssn_bidx = %s WHERE id = %s",
                     [ssn, b"\x11" * 32, target.id])
    with scope(doctor, other), pytest.raises(DecryptionFailed) as caught:
        PatientRepository(doctor).get(id=target.id)
    assert ssn is not None and ssn not in str(caught.value)


def test_the_database_refuses_plaintext_and_unindexed_ssns(
    migrated_db: ServerDatabase, clinic: Clinic
) -> None:
    with superuser(migrated_db) as conn:
        patient = conn.execute(
            "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
            " VALUES (%s, 'plain', 'A', 'B', DATE '1990-01-01', 'other') RETURNING id",
            [clinic.id]).fetchone()
        assert patient is not None
        for ssn, bidx in ((SSN, b"a" * 32), ("hc1:1:AAAA", None), (None, b"a" * 32),
                          ("hc1:1:AAAA", b"short")):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("UPDATE patients SET ssn = %s, ssn_bidx = %s WHERE id = %s",
                             [ssn, bidx, patient[0]])


# --- blind index -------------------------------------------------------------------------


def test_blind_index_finds_exactly_the_patient_in_any_spelling(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    other = new_clinic(migrated_db.superuser_url, patients=0)
    with scope(doctor, clinic):
        patients = [create(doctor, fake_ssn(n)) for n in range(5)]
        wanted = create(doctor, SSN)
        repo = PatientRepository(doctor)
        for spelling in (SSN, "123456789", " 123 45 6789 ", "123-456789"):
            assert repo.by_ssn(ssn=spelling) == wanted
        assert repo.by_ssn(ssn="123-45-6780") is None
        assert all(repo.by_ssn(ssn=p.ssn or "") == p for p in patients)
        with pytest.raises(TypeError) as invalid:
            repo.by_ssn(ssn="123-45-678X")
        assert "'ssn'" in str(invalid.value) and "678" not in str(invalid.value)
    with scope(doctor, other):
        assert PatientRepository(doctor).by_ssn(ssn=SSN) is None  # another clinic's patient
        theirs = create(doctor, SSN)  # the same SSN in another clinic is another patient
        assert PatientRepository(doctor).by_ssn(ssn="123456789") == theirs
    assert stored(migrated_db, theirs.id)[1] != stored(migrated_db, wanted.id)[1]


def test_the_blind_index_keeps_ssns_unique_per_clinic(doctor: Database, clinic: Clinic) -> None:
    with scope(doctor, clinic):
        create(doctor, SSN)
        with pytest.raises(UniqueViolation) as caught:
            create(doctor, "123 45 6789")
        assert caught.value.constraint == "patients_clinic_ssn_bidx_key"
        assert "6789" not in str(caught.value)
        other = create(doctor, None)
        with pytest.raises(UniqueViolation):
            PatientRepository(doctor).set_ssn(id=other.id, ssn="123456789")


# --- who may see the SSN, in PostgreSQL -------------------------------------------------------

REASON = "unresponsive in the waiting room"


@pytest.fixture
def staff(migrated_db: ServerDatabase) -> StaffClinic:
    """A member in each staff role. Its patient holds a stand-in ciphertext: enough to see
    who is given it, as nothing is decrypted through raw SQL."""
    return staff_clinic(migrated_db.superuser_url)


@pytest.fixture
def app_conn(migrated_db: ServerDatabase) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db.app_url, autocommit=True) as conn:
        yield conn


def act(conn: psycopg.Connection[Any], staff: StaffClinic, actor: UUID | None,
        role: str) -> None:
    """The context as hcrepo's context statement sets it: transaction-local, app.role always
    set ('' when nothing is claimed)."""
    conn.execute("SELECT set_config('app.clinic_id', %s, true),"
                 " set_config('app.actor_id', %s, true), set_config('app.role', %s, true)",
                 [str(staff.id), "" if actor is None else str(actor), role])


def carry_glass(conn: psycopg.Connection[Any], reason: str, access: UUID) -> None:
    conn.execute("SELECT set_config('app.emergency_reason', %s, true),"
                 " set_config('app.emergency_access_id', %s, true)", [reason, str(access)])


def break_glass(conn: psycopg.Connection[Any], reason: str) -> UUID:
    """Records a break-glass for the actor in context and carries it, as hcrepo does."""
    row = conn.execute("SELECT audit.record_emergency_access(%s)", [reason]).fetchone()
    assert row is not None
    carry_glass(conn, reason, row[0])
    return UUID(str(row[0]))


def ssn_seen(conn: psycopg.Connection[Any], patient_id: UUID) -> tuple[Any, ...] | None:
    return conn.execute("SELECT ssn FROM patient_records WHERE id = %s",
                        [patient_id]).fetchone()


@pytest.mark.parametrize(("member", "claimed", "glass", "visible"), [
    ("doctor", "doctor", "", True), ("admin", "admin", "", True),
    ("nurse", "nurse", "", False), ("receptionist", "receptionist", "", False),
    # Nothing claimed: the membership role decides.
    ("doctor", "", "", True), ("admin", "", "", True), ("nurse", "", "", False),
    ("receptionist", "", "", False),
    (None, "", "", False),  # a clinic-level context: no actor, no role
    ("nurse", "nurse", "recorded", True), ("nurse", "", "recorded", True),
    ("doctor", "doctor", "recorded", True),
    ("nurse", "nurse", "by hand", False),  # a reason and an id, but no recorded row
])
def test_the_application_role_reads_ssn_only_as_allowed(
    staff: StaffClinic, app_conn: psycopg.Connection[Any], migrated_db: ServerDatabase,
    member: str | None, claimed: str, glass: str, visible: bool,
) -> None:
    ciphertext, _ = stored(migrated_db, staff.patient_id)
    assert ciphertext is not None
    with app_conn.transaction():
        act(app_conn, staff, None if member is None else staff.members[member], claimed)
        if glass == "recorded":
            break_glass(app_conn, REASON)
        elif glass == "by hand":
            carry_glass(app_conn, REASON, uuid.uuid4())
        assert ssn_seen(app_conn, staff.patient_id) == ((ciphertext,) if visible else (None,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), app_conn.transaction():
            app_conn.execute("SELECT ssn FROM patients WHERE id = %s", [staff.patient_id])
        with pytest.raises(psycopg.errors.InsufficientPrivilege), app_conn.transaction():
            app_conn.execute("SELECT count(*) FROM patients WHERE ssn IS NOT NULL")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), app_conn.transaction():
            app_conn.execute("SELECT p FROM patients p")


def test_a_receptionist_cannot_break_the_glass_to_the_ssn(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    receptionist = staff.members["receptionist"]
    for claimed in ("receptionist", ""):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="for clinicians"), \
                app_conn.transaction():
            act(app_conn, staff, receptionist, claimed)
            break_glass(app_conn, "cardiac arrest")
    # The nurse's recorded break-glass, borrowed with its reason, widens nothing.
    with app_conn.transaction():
        act(app_conn, staff, staff.members["nurse"], "nurse")
        access = break_glass(app_conn, REASON)
    with app_conn.transaction():
        act(app_conn, staff, receptionist, "receptionist")
        carry_glass(app_conn, REASON, access)
        assert ssn_seen(app_conn, staff.patient_id) == (None,)


def test_patient_records_refuse_a_role_the_actor_does_not_hold(
    staff: StaffClinic, app_conn: psycopg.Connection[Any]
) -> None:
    members = staff.members
    for actor, claimed, refusal in (
        (members["receptionist"], "doctor", "does not hold the claimed staff role"),
        (members["nurse"], "admin", "does not hold the claimed staff role"),
        (staff.outsider, "doctor", "does not hold the claimed staff role"),
        (None, "doctor", "without an actor"),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=refusal), \
                app_conn.transaction():
            act(app_conn, staff, actor, claimed)
            ssn_seen(app_conn, staff.patient_id)
    # A doctor of another clinic, claiming nothing, holds no role here: not even the row.
    with app_conn.transaction():
        act(app_conn, staff, staff.outsider, "")
        assert ssn_seen(app_conn, staff.patient_id) is None


def test_repositories_give_the_ssn_only_to_roles_that_may_see_it(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    with scope(doctor, clinic):
        created = create(doctor, SSN)
    members = {"doctor": clinic.actor_id} | {
        role: staff_member(migrated_db.superuser_url, clinic.id, role)
        for role in ("admin", "nurse", "receptionist")}
    cases: list[tuple[dict[str, Any], str | None]] = []
    for role, member in members.items():
        expected = SSN if role in ("doctor", "admin") else None
        cases += [({"actor_id": member, "role": role}, expected),
                  ({"actor_id": member}, expected)]  # the membership role
    cases += [({}, None),  # a clinic-level context
              ({"actor_id": members["nurse"], "emergency_reason": REASON}, SSN),
              ({"actor_id": members["nurse"], "role": "nurse", "emergency_reason": REASON},
               SSN)]
    for given, expected in cases:
        with doctor.context(clinic_id=clinic.id, **given):
            patients = PatientRepository(doctor)
            found, by_ssn = patients.get(id=created.id), patients.by_ssn(ssn=SSN)
        assert found is not None and by_ssn is not None
        assert (found.ssn, by_ssn.ssn) == (expected, expected), given
        assert found.model_copy(update={"ssn": SSN}) == created
    # The front desk's break-glass is refused by the database before the block runs.
    block = doctor.context(clinic_id=clinic.id, actor_id=members["receptionist"],
                           emergency_reason=REASON)
    with pytest.raises(RowSecurityViolation, match="for clinicians"), block:
        pytest.fail("the block ran")


# --- keys and settings -------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "value"), [
    ("HCREPO_MASTER_KEY", "not base64!"),
    ("HCREPO_MASTER_KEY", base64.b64encode(b"short").decode()),
    ("HCREPO_MASTER_KEY", f"1:{MASTER},2:{BLIND}"),
    ("HCREPO_MASTER_KEY_PREVIOUS", MASTER),
    ("HCREPO_BLIND_INDEX_KEY", base64.b64encode(os.urandom(16)).decode()),
])
def test_invalid_keys_are_config_errors_naming_the_setting(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(database_url="postgresql://x@localhost/x", **{setting: value})
    assert caught.value.setting == setting
    assert value not in str(caught.value) and MASTER not in str(caught.value)


def test_a_previous_master_key_cannot_repeat_the_current_version() -> None:
    with pytest.raises(ConfigError) as caught:
        SettingsMasterKeys(f"2:{MASTER}", f"2:{BLIND}")
    assert caught.value.setting == "HCREPO_MASTER_KEY_PREVIOUS"


def test_missing_keys_are_config_errors_naming_the_setting(
    migrated_db: ServerDatabase, clinic: Clinic, doctor: Database
) -> None:
    with scope(doctor, clinic):
        sealed = create(doctor, SSN)
    for given, missing in (({}, "HCREPO_BLIND_INDEX_KEY"),
                           ({"HCREPO_BLIND_INDEX_KEY": BLIND}, "HCREPO_MASTER_KEY")):
        settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1,
                            pool_max=2, **given)
        with Database(settings) as db, scope(db, clinic):
            with pytest.raises(ConfigError) as caught:
                create(db, SSN)
            assert caught.value.setting == missing
            assert "patients.ssn (create_patient)" in str(caught.value)
            if missing == "HCREPO_MASTER_KEY":
                with pytest.raises(ConfigError) as reading:
                    PatientRepository(db).get(id=sealed.id)
                assert reading.value.setting == "HCREPO_MASTER_KEY"
            unsealed = create(db, None)  # no SSN: no key needed
            assert PatientRepository(db).get(id=unsealed.id) == unsealed


def test_a_wrong_master_key_does_not_unwrap(
    migrated_db: ServerDatabase, clinic: Clinic, doctor: Database
) -> None:
    with scope(doctor, clinic):
        sealed = create(doctor, SSN)
    settings = keyed(migrated_db.app_url, pool_max=2, HCREPO_MASTER_KEY=new_key())
    with Database(settings) as db, scope(db, clinic), pytest.raises(DecryptionFailed) as caught:
        PatientRepository(db).get(id=sealed.id)
    assert "master key version 1" in str(caught.value)


# --- rotation -------------------------------------------------------------------------------


def versions(migrated_db: ServerDatabase, clinic: Clinic) -> dict[int, int]:
    with superuser(migrated_db) as conn:
        rows = conn.execute(
            "SELECT split_part(ssn, ':', 2)::int, count(*) FROM patients WHERE clinic_id = %s"
            " AND ssn IS NOT NULL GROUP BY 1", [clinic.id]).fetchall()
    return dict(rows)


def seeded_clinic(doctor: Database, clinic: Clinic, count: int) -> dict[UUID, str]:
    with scope(doctor, clinic):
        return {create(doctor, fake_ssn(n)).id: fake_ssn(n) for n in range(count)}


def all_readable(db: Database, clinic: Clinic, expected: dict[UUID, str]) -> bool:
    with scope(db, clinic):
        found = {p.id: p.ssn for p in PatientRepository(db).stream_all()}
    return found == expected


def test_reads_continue_across_a_data_key_rotation_in_another_thread(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    expected = seeded_clinic(doctor, clinic, 12)
    midway = threading.Event()
    read_midway = threading.Event()
    done = threading.Event()
    seen: list[dict[int, int]] = []
    failures: list[BaseException] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        try:
            while not done.is_set() and reads < 10_000:
                assert all_readable(doctor, clinic, expected)
                with scope(doctor, clinic):
                    for patient_id, ssn in list(expected.items())[:3]:
                        found = PatientRepository(doctor).get(id=patient_id)
                        assert found is not None and found.ssn == ssn
                reads += 1
                if midway.is_set():
                    read_midway.set()
        except BaseException as exc:
            failures.append(exc)
            read_midway.set()

    def progress(clinic_id: UUID, column: Column, count: int) -> None:
        if not midway.is_set():
            seen.append(versions(migrated_db, clinic))
            midway.set()
            assert read_midway.wait(30), "no read completed while the rotation was midway"

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        moved = rotation.rotate_data(owner(migrated_db), SettingsMasterKeys(MASTER),
                                     SSN_COLUMNS, only=clinic.id, batch=4, progress=progress)
    finally:
        done.set()
        thread.join(30)
    assert not failures, failures
    assert moved == 12
    assert seen == [{1: 8, 2: 4}]  # old and new versions side by side while reads went on
    assert versions(migrated_db, clinic) == {2: 12}
    assert all_readable(doctor, clinic, expected)


def test_a_rotation_that_dies_midway_leaves_every_row_readable_and_a_rerun_finishes(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    expected = seeded_clinic(doctor, clinic, 10)
    batches = 0

    def crash_after_two(clinic_id: UUID, column: Column, count: int) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:
            raise KeyboardInterrupt  # the process is stopped between two batches

    master = SettingsMasterKeys(MASTER)
    with pytest.raises(KeyboardInterrupt):
        rotation.rotate_data(owner(migrated_db), master, SSN_COLUMNS, only=clinic.id,
                             batch=3, progress=crash_after_two)
    assert versions(migrated_db, clinic) == {1: 4, 2: 6}
    assert all_readable(doctor, clinic, expected)
    status = rotation.status(owner(migrated_db), SSN_COLUMNS, only=clinic.id)
    assert [(s.version, s.state, s.values[SSN_COLUMNS[0]]) for s in status] == [
        (1, "retired", 4), (2, "active", 6)]
    # The re-run resumes the rotation (no third version) and completes it.
    assert rotation.rotate_data(owner(migrated_db), master, SSN_COLUMNS, only=clinic.id,
                                batch=3) == 4
    assert versions(migrated_db, clinic) == {2: 10}
    assert all_readable(doctor, clinic, expected)
    with superuser(migrated_db) as conn:
        events = conn.execute(
            "SELECT kind, event, from_version, to_version, values_reencrypted"
            " FROM key_rotations WHERE clinic_id = %s ORDER BY id", [clinic.id]).fetchall()
    assert events == [("data", "started", 1, 2, 0), ("data", "started", None, 2, 0),
                      ("data", "completed", None, 2, 4)]


def test_a_master_key_rotation_rewraps_every_data_key(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    expected = seeded_clinic(doctor, clinic, 3)
    second = new_key()
    both = SettingsMasterKeys(f"2:{second}", f"1:{MASTER}")
    assert rotation.rotate_master(owner(migrated_db), both, only=clinic.id) == 1
    assert rotation.rotate_master(owner(migrated_db), both, only=clinic.id) == 0  # done
    with superuser(migrated_db) as conn:
        assert conn.execute("SELECT master_version FROM clinic_data_keys WHERE clinic_id = %s",
                            [clinic.id]).fetchall() == [(2,)]
    only_new = keyed(migrated_db.app_url, pool_max=2, HCREPO_MASTER_KEY=f"2:{second}")
    with Database(only_new) as db:
        assert all_readable(db, clinic, expected)
    only_old = only_new.model_copy(update={"master_key": only_new.master_key.__class__(MASTER)})
    with Database(only_old) as db, scope(db, clinic), pytest.raises(ConfigError) as caught:
        PatientRepository(db).get(id=next(iter(expected)))
    assert caught.value.setting == "HCREPO_MASTER_KEY" and "version 2" in str(caught.value)


def test_key_rotations_are_append_only(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    seeded_clinic(doctor, clinic, 1)
    rotation.rotate_data(owner(migrated_db), SettingsMasterKeys(MASTER), SSN_COLUMNS,
                         only=clinic.id)
    with owner(migrated_db)() as conn, conn.transaction():
        conn.execute("SELECT set_config('app.clinic_id', %s, true)", [str(clinic.id)])
        for statement in ("UPDATE key_rotations SET values_reencrypted = 0",
                          "DELETE FROM key_rotations"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)
    with psycopg.connect(migrated_db.app_url) as app:
        for statement in ("UPDATE key_rotations SET values_reencrypted = 0",
                          "DELETE FROM key_rotations",
                          "INSERT INTO key_rotations (clinic_id, kind, event, to_version)"
                          " VALUES (gen_random_uuid(), 'data', 'started', 1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), app.transaction():
                app.execute(statement)


# --- the command ----------------------------------------------------------------------------


def test_keys_status_and_rotate_from_the_command_line(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    expected = seeded_clinic(doctor, clinic, 3)
    target = ("--database", migrated_db.owner_url, "--clinic", str(clinic.id))
    env = {"HCREPO_MASTER_KEY": MASTER}
    status = hcrepo("keys", "status", *target, env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split() == [str(clinic.id), "1", "active", "1", "3"]
    rotated = hcrepo("keys", "rotate", "--data", "--batch", "2", *target, env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "3 values re-encrypted" in rotated.stdout
    after = hcrepo("keys", "status", *target, env=env).stdout.splitlines()[1:]
    assert [line.split()[1:] for line in after] == [["1", "retired", "1", "0"],
                                                     ["2", "active", "1", "3"]]
    assert all_readable(doctor, clinic, expected)
    for ssn in expected.values():
        assert ssn not in status.stdout + rotated.stdout + rotated.stderr


@pytest.mark.parametrize(("env", "setting"), [
    ({}, "HCREPO_MASTER_KEY"), ({"HCREPO_MASTER_KEY": "nope"}, "HCREPO_MASTER_KEY"),
    ({"HCREPO_MASTER_KEY": MASTER, "HCREPO_MASTER_KEY_PREVIOUS": "x"},
     "HCREPO_MASTER_KEY_PREVIOUS"),
])
def test_rotate_without_a_valid_master_key_is_one_line_naming_the_setting(
    migrated_db: ServerDatabase, env: dict[str, str], setting: str
) -> None:
    result = hcrepo("keys", "rotate", "--master", "--database", migrated_db.owner_url, env=env)
    assert result.returncode == 2
    assert_one_line(result.stderr, starts=f"hcrepo: {setting}: ")
    assert MASTER not in result.stderr


def test_plaintext_ssns_are_moved_aside_by_the_migration_and_sealed_by_encrypt_existing(
    fresh_database: FreshDatabase, tmp_path: Path
) -> None:
    db = fresh_database()
    before = tmp_path / "before"
    before.mkdir()
    for path in migrate.migrations_dir().glob("000[1-5]_*.sql"):
        shutil.copy(path, before / path.name)
    migrate.apply(db.owner_url, setting="owner URL", source=before)
    ssns = {"a": "123-45-6789", "b": "123456789", "c": "not an ssn", "d": "987 65 4321"}
    with psycopg.connect(db.superuser_url) as conn:
        clinic_a, clinic_b = (new_clinic(db.superuser_url, patients=0) for _ in range(2))
        ids = {}
        for name, ssn in ssns.items():
            clinic_id = (clinic_b if name == "d" else clinic_a).id
            row = conn.execute(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth,"
                " sex, ssn) VALUES (%s, %s, 'Old', 'Row', DATE '1970-01-01', 'other', %s)"
                " RETURNING id", [clinic_id, name, ssn]).fetchone()
            assert row is not None
            ids[name] = row[0]
    migrate.apply(db.owner_url, setting="owner URL")
    migrate.set_role_password(db.owner_url, migrate.APP_ROLE, APP_PASSWORD)

    def plaintext() -> list[tuple[Any, ...]]:
        with psycopg.connect(db.superuser_url) as conn:
            return conn.execute("SELECT mrn, ssn FROM patients WHERE ssn IS NOT NULL"
                                " ORDER BY mrn").fetchall()

    with psycopg.connect(db.superuser_url) as conn:
        assert conn.execute("SELECT count(*) FROM patients_plaintext_ssn").fetchone() == (4,)
    assert plaintext() == []
    # Rolled back before anything was encrypted, the SSNs go back where they were.
    assert migrate.rollback(db.owner_url, setting="owner URL") == ["0008_field_encryption"]
    assert plaintext() == sorted(ssns.items())
    migrate.apply(db.owner_url, setting="owner URL")
    assert plaintext() == []
    blind = Settings(database_url=db.app_url, HCREPO_BLIND_INDEX_KEY=BLIND).blind_index()
    assert blind is not None
    result = rotation.encrypt_existing(owner(db), SettingsMasterKeys(MASTER), blind, batch=2)
    # "b" is "a" spelled otherwise: the first sealed keeps it, the other stays aside, as
    # does "c", which is no SSN.
    assert result == rotation.Leftover(encrypted=2, left_aside=2)
    with psycopg.connect(db.superuser_url) as conn:
        left = conn.execute("SELECT patient_id FROM patients_plaintext_ssn").fetchall()
        stored_ssns = conn.execute("SELECT ssn FROM patients WHERE ssn IS NOT NULL").fetchall()
    sealed_first = "a" if ids["a"] < ids["b"] else "b"  # batches go in patient id order
    duplicate = "b" if sealed_first == "a" else "a"
    assert {row[0] for row in left} == {ids[duplicate], ids["c"]}
    assert all(row[0].startswith("hc1:1:") for row in stored_ssns) and len(stored_ssns) == 2
    settings = keyed(db.app_url, pool_max=2)
    # Once SSNs are encrypted, the rollback refuses: it would lose them.
    with pytest.raises(migrate.MigrationFailed):
        migrate.rollback(db.owner_url, setting="owner URL")
    with Database(settings) as app:
        # The clinic's doctor reads the SSNs; a clinic-level context (no actor) may not.
        with app.context(clinic_id=clinic_a.id):
            found = PatientRepository(app).by_ssn(ssn="123 45 6789")
            assert found is not None and (found.id, found.ssn) == (ids[sealed_first], None)
        with scope(app, clinic_a):
            found = PatientRepository(app).by_ssn(ssn="123 45 6789")
            assert found is not None
            assert (found.id, found.ssn) == (ids[sealed_first], ssns[sealed_first])
        with scope(app, clinic_b):
            found = PatientRepository(app).by_ssn(ssn="987654321")
            assert found is not None and found.ssn == ssns["d"]


# --- declarations ---------------------------------------------------------------------------


class _Secret(BaseModel):
    id: UUID
    secret: Annotated[str | None, Encrypted()]


class _BadSecret(BaseModel):
    id: UUID
    secret: Annotated[int | None, Encrypted()]


class _Anonymous(BaseModel):
    secret: Annotated[str | None, Encrypted()]


@pytest.mark.parametrize(("sql", "model", "tenant", "problem"), [
    ("-- name: q\nSELECT id, secret FROM t WHERE id = :id", _Secret, True,
     "_Secret.secret is declared Encrypted() but the query has no '-- encrypt: <table>.secret'"),
    ("-- name: q\n-- encrypt: t.secret\nSELECT id, secret FROM t WHERE id = :id", _BadSecret,
     True, "_BadSecret.secret is encrypted: its type must be str or str | None"),
    ("-- name: q\n-- encrypt: t.secret\nSELECT secret FROM t", _Anonymous, True,
     "_Anonymous needs an 'id' field"),
    ("-- name: q\n-- encrypt: t.secret\nSELECT id, secret FROM t WHERE secret = :secret",
     _Secret, True, "an encrypted parameter needs :id in the SQL"),
    ("-- name: q\n-- encrypt: t.secret\nSELECT id, secret FROM t WHERE id = :id", _Secret,
     False, "encrypted columns need a tenant-scoped repository"),
])
def test_inconsistent_encryption_declarations_fail_when_the_class_is_defined(
    tmp_path: Path, sql: str, model: type[BaseModel], tenant: bool, problem: str
) -> None:
    path = tmp_path / "secrets.sql"
    path.write_text(sql + "\n")
    params = re.findall(r":(\w+)", sql.split("\n", 2)[-1])
    signature = "".join(f", {name}: Any" for name in dict.fromkeys(params))
    namespace: dict[str, Any] = {"Any": Any, "Model": model}
    exec(f"def q(self{', *' if params else ''}{signature}) -> 'Model | None': ...", namespace)
    with pytest.raises(SqlFileError) as caught:
        type("Secrets", (Repository,), {"q": query("q")(namespace["q"]),
                                        "__module__": __name__},
             sql=str(path), tenant=tenant)
    assert problem in str(caught.value)


def test_the_cache_holds_the_ciphertext_and_every_hit_decrypts(
    cached_db: CachedDatabase, migrated_db: ServerDatabase, clinic: Clinic,
    raw_redis: redis.Redis | RedisCluster,
) -> None:
    db = cached_db(HCREPO_MASTER_KEY=MASTER, HCREPO_BLIND_INDEX_KEY=BLIND)
    with scope(db, clinic):
        created = create(db, SSN)
    with scope(db, clinic):  # the next request: no write of its own to wait for
        hits = Counts("get_patient")
        patients = PatientRepository(db)
        assert [patients.get(id=created.id) for _ in range(3)] == [created] * 3
        assert hits["hits"] == 2
    keys = value_keys(raw_redis, db.settings.cache_key_prefix, "get_patient")
    assert len(keys) == 1
    raw = raw_redis.get(keys[0])
    assert isinstance(raw, bytes)
    codec = ValueCodec(Patient | None, AESGCM(base64.b64decode(ENCRYPTION_KEY)))
    cached = codec.decode(raw, read_header(raw), key=keys[0].decode())
    assert cached is not None and cached.ssn == stored(migrated_db, created.id)[0]
    assert cached.ssn.startswith("hc1:") and SSN not in cached.model_dump_json()


def test_a_stream_that_meets_a_bad_ciphertext_fails_there_and_frees_its_connection(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    with scope(doctor, clinic):
        rows = sorted((create(doctor, fake_ssn(n)) for n in range(4)), key=lambda p: p.id)
    with superuser(migrated_db) as conn:  # the third row gets the first row's ciphertext
        conn.execute("UPDATE patients SET ssn = %s, ssn_bidx = %s WHERE id = %s",
                     [stored(migrated_db, rows[0].id)[0], b"\x22" * 32, rows[2].id])
    seen = []
    with scope(doctor, clinic), pytest.raises(DecryptionFailed):
        for patient in PatientRepository(doctor).stream_all():
            seen.append(patient)
    assert seen == rows[:2]
    for _ in range(4):  # more reads than the pool has connections: the stream gave its back
        with scope(doctor, clinic):
            assert PatientRepository(doctor).get(id=rows[1].id) == rows[1]


def test_a_process_that_has_not_seen_a_rotation_yet_writes_readable_values_the_rerun_moves(
    doctor: Database, clinic: Clinic, migrated_db: ServerDatabase,
    make_db: MakeDatabase, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keyring, "ACTIVE_TTL", 3600.0)  # it will not look again for an hour
    expected = seeded_clinic(doctor, clinic, 2)  # doctor now knows version 1 as active
    master = SettingsMasterKeys(MASTER)
    assert rotation.rotate_data(owner(migrated_db), master, SSN_COLUMNS, only=clinic.id) == 2
    with scope(doctor, clinic):
        stale = create(doctor, "555-55-5555")
    # Another process, which loads the clinic's keys now.
    other = make_db(HCREPO_MASTER_KEY=MASTER, HCREPO_BLIND_INDEX_KEY=BLIND)
    with scope(other, clinic):
        fresh = create(other, "555-55-5556")
    assert versions(migrated_db, clinic) == {1: 1, 2: 3}
    expected |= {stale.id: "555-55-5555", fresh.id: "555-55-5556"}
    assert all_readable(doctor, clinic, expected) and all_readable(other, clinic, expected)
    # The re-run finishes the rotation (no version 3) and moves the straggler.
    assert rotation.rotate_data(owner(migrated_db), master, SSN_COLUMNS, only=clinic.id) == 1
    assert versions(migrated_db, clinic) == {2: 4}
    assert all_readable(doctor, clinic, expected)


class CountingKms:
    """A key service standing in for a KMS client: its own key, every call counted. The
    settings hold no master key at all, so only this object can wrap and unwrap."""

    def __init__(self) -> None:
        self._aead = AESGCM(os.urandom(32))
        self.calls: list[tuple[str, bytes]] = []

    @property
    def current_version(self) -> int:
        return 7

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        self.calls.append(("wrap", context))
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        self.calls.append(("unwrap", context))
        assert version == 7
        return self._aead.decrypt(wrapped[:12], wrapped[12:], context)


@pytest.mark.parametrize("opened", ["constructor", "from_env"])
def test_a_key_service_replaces_the_master_key_setting(
    migrated_db: ServerDatabase, clinic: Clinic, monkeypatch: pytest.MonkeyPatch, opened: str
) -> None:
    kms = CountingKms()
    if opened == "constructor":
        db = Database(keyed(migrated_db.app_url, HCREPO_MASTER_KEY=None), master_keys=kms)
    else:
        for name, value in (("DATABASE_URL", migrated_db.app_url), ("REDIS_URL", ""),
                            ("HCREPO_BLIND_INDEX_KEY", BLIND)):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HCREPO_MASTER_KEY", raising=False)
        db = Database.from_env(master_keys=kms)
    with db, scope(db, clinic):
        created = create(db, SSN)
        assert PatientRepository(db).get(id=created.id) == created
    # The clinic's first data key, wrapped by the service (and read back through it).
    assert [kind for kind, _ in kms.calls].count("wrap") == 1
    before = len(kms.calls)
    with psycopg.connect(migrated_db.superuser_url) as conn:
        assert conn.execute("SELECT master_version FROM clinic_data_keys WHERE clinic_id = %s",
                            [clinic.id]).fetchall() == [(7,)]
    # Another process (empty key cache) needs the service to unwrap the key.
    other = Database(keyed(migrated_db.app_url, HCREPO_MASTER_KEY=None), master_keys=kms)
    with other, scope(other, clinic):
        found = PatientRepository(other).get(id=created.id)
    assert found is not None and found.ssn == SSN
    assert [kind for kind, _ in kms.calls[before:]] == ["unwrap"]
