"""Units of work against the real primary: commit hooks, savepoints, rollback, a clean
connection afterwards, isolation flags, refusals before any round trip, round-trip counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import pq

from hcrepo import (
    ActorRequired,
    Database,
    DatabaseError,
    HcrepoError,
    TenantContextMissing,
    UniqueViolation,
)
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, MakeDatabase, Session, new_clinic
from tests.support.wire import Relay, relay


def phone_of(server: ServerDatabase, patient_id: Any) -> str | None:
    """The committed phone as the superuser sees it (another session, so only committed data)."""
    with psycopg.connect(server.superuser_url, autocommit=True) as conn:
        row = conn.execute("SELECT phone FROM patients WHERE id = %s", [patient_id]).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def leftovers(db: Database) -> tuple[pq.TransactionStatus, Any, Any, int]:
    """What the next borrower of the pool's only connection would inherit."""
    with db._router.primary.connection() as conn:
        status = conn.info.transaction_status
        row = conn.execute(
            "SELECT current_setting('app.clinic_id', true), current_setting('app.actor_id', true)"
        ).fetchone()
        assert row is not None
        return status, row[0], row[1], conn.info.backend_pid


# --- after-commit hooks ------------------------------------------------------------------


def test_hooks_run_after_commit_and_see_committed_data(
    make_db: MakeDatabase, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    db = make_db()
    patient = clinic.patient_ids[0]
    seen: list[str | None] = []
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id), db.unit_of_work() as uow:
        Clinical(uow).set_phone(id=patient, phone="+1 555 0101")
        uow.after_commit(lambda: seen.append(phone_of(migrated_db, patient)))
        assert seen == []
        assert phone_of(migrated_db, patient) is None  # not committed yet
    assert seen == ["+1 555 0101"]
    assert uow.committed


def test_hooks_never_run_after_rollback(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    ran: list[str] = []
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        with pytest.raises(ZeroDivisionError), db.unit_of_work() as uow:
            Clinical(uow).set_phone(id=clinic.patient_ids[0], phone="+1 555 0102")
            uow.after_commit(lambda: ran.append("body raised"))
            _ = 1 / 0
        with pytest.raises(UniqueViolation), db.unit_of_work() as uow:
            uow.after_commit(lambda: ran.append("statement failed"))
            Clinical(uow).add_patient(clinic_id=clinic.id, mrn="dup")
            Clinical(uow).add_patient(clinic_id=clinic.id, mrn="dup")
        assert Clinical(db).count_mrn(mrn="dup") == 0
    assert ran == []
    assert not uow.committed


def test_commit_after_a_swallowed_error_rolls_back_and_says_so(
    make_db: MakeDatabase, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    """COMMIT of an aborted transaction answers ROLLBACK without an error: hcrepo raises."""
    db = make_db()
    ran: list[str] = []
    with (
        db.context(clinic_id=clinic.id, actor_id=clinic.actor_id),
        pytest.raises(DatabaseError) as caught,
        db.unit_of_work() as uow,
    ):
        Clinical(uow).set_phone(id=clinic.patient_ids[0], phone="+1 555 0103")
        uow.after_commit(lambda: ran.append("hook"))
        Clinical(uow).add_patient(clinic_id=clinic.id, mrn="swallowed")
        # Caught, not rolled back to a savepoint: the transaction is aborted.
        with contextlib.suppress(UniqueViolation):
            Clinical(uow).add_patient(clinic_id=clinic.id, mrn="swallowed")
    assert caught.value.sqlstate == "25P02"
    assert "nothing was committed" in str(caught.value)
    assert ran == []
    assert phone_of(migrated_db, clinic.patient_ids[0]) is None


def test_a_failing_hook_does_not_stop_the_others(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("hook failed")

    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        with pytest.raises(RuntimeError, match="hook failed"), db.unit_of_work() as uow:
            Clinical(uow).set_phone(id=clinic.patient_ids[0], phone="+1 555 0104")
            uow.after_commit(broken)
            uow.after_commit(lambda: ran.append("second"))
        assert ran == ["second"]
        assert Clinical(db).patient(id=clinic.patient_ids[0]).phone == "+1 555 0104"  # type: ignore[union-attr]


# --- savepoints and rollback -----------------------------------------------------------


def test_savepoints_nest_and_roll_back_only_their_own_work(
    make_db: MakeDatabase, migrated_db: ServerDatabase
) -> None:
    db = make_db()
    clinic = new_clinic(migrated_db.superuser_url, patients=3)
    first, second, third = clinic.patient_ids
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id), db.unit_of_work() as uow:
        repo = Clinical(uow)
        repo.set_phone(id=first, phone="outer")
        with uow.savepoint():
            repo.set_phone(id=second, phone="level 1")
            with pytest.raises(LookupError), uow.savepoint():
                repo.set_phone(id=third, phone="level 2")
                assert repo.patient(id=third).phone == "level 2"  # type: ignore[union-attr]
                raise LookupError("undo level 2")
            assert repo.patient(id=third).phone is None  # type: ignore[union-attr]
        with pytest.raises(UniqueViolation), uow.savepoint():
            repo.set_phone(id=third, phone="rolled back with the failed statement")
            repo.add_patient(clinic_id=clinic.id, mrn=f"{clinic.id}-dup")
            repo.add_patient(clinic_id=clinic.id, mrn=f"{clinic.id}-dup")
        # The failed statement was rolled back to its savepoint: the transaction goes on.
        repo.set_phone(id=third, phone="after")
    phones = [phone_of(migrated_db, p) for p in (first, second, third)]
    assert phones == ["outer", "level 1", "after"]


def test_any_exception_rolls_back_and_the_connection_goes_back_clean(
    make_db: MakeDatabase, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    patient = clinic.patient_ids[0]
    _, _, _, pid = leftovers(db)
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        for failure in (KeyboardInterrupt, ValueError, HcrepoError):
            with pytest.raises(failure), db.unit_of_work(isolation="serializable") as uow:
                Clinical(uow).set_phone(id=patient, phone="never")
                assert uow.backend_pid == pid  # the pool's only connection
                raise failure("boom")
            assert phone_of(migrated_db, patient) is None
            assert leftovers(db) == (pq.TransactionStatus.IDLE, "", "", pid)
        with db.unit_of_work() as uow:
            Clinical(uow).set_phone(id=patient, phone="committed")
        assert leftovers(db) == (pq.TransactionStatus.IDLE, "", "", pid)
        # A plain read and a plain write leave nothing either.
        Clinical(db).set_phone(id=patient, phone="plain write")
        assert Clinical(db).patient(id=patient).phone == "plain write"  # type: ignore[union-attr]
        assert leftovers(db) == (pq.TransactionStatus.IDLE, "", "", pid)
    with db._router.primary.connection() as conn:
        row = conn.execute("SHOW statement_timeout").fetchone()
        assert row == ("0",)


def test_a_unit_of_work_is_entered_once_and_used_while_open(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id):
        uow = db.unit_of_work()
        with uow:
            pass
        with pytest.raises(HcrepoError, match="entered once"), uow:
            pass
        with pytest.raises(HcrepoError, match="not open"):
            Clinical(uow).patients()


# --- isolation and read-only -----------------------------------------------------------


@pytest.mark.parametrize(
    ("isolation", "shown"),
    [(None, "read committed"), ("repeatable_read", "repeatable read"),
     ("serializable", "serializable"), ("REPEATABLE READ", "repeatable read")],
)
def test_isolation_level_takes_effect(
    make_db: MakeDatabase, isolation: str | None, shown: str
) -> None:
    db = make_db()
    with db.unit_of_work(isolation=isolation) as uow:
        probe = Session(uow).probe()
    assert (probe.isolation, probe.read_only) == (shown, "off")


def test_read_only_takes_effect_and_refuses_writes(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        with db.unit_of_work(read_only=True) as uow:
            assert Session(uow).probe().read_only == "on"
        with pytest.raises(DatabaseError) as caught, db.unit_of_work(read_only=True) as uow:
            Clinical(uow).set_phone(id=clinic.patient_ids[0], phone="refused")
    assert caught.value.sqlstate == "25006"
    assert "read-only" in str(caught.value)


def test_unknown_isolation_level_is_refused_before_connecting(make_db: MakeDatabase) -> None:
    db = make_db()
    with pytest.raises(ValueError, match="isolation must be one of"):
        db.unit_of_work(isolation="chaos")


# --- refusals before any round trip, and round-trip counts --------------------------------


@pytest.fixture
def wired(migrated_db: ServerDatabase) -> Iterator[tuple[Database, Relay]]:
    """A one-connection hcrepo Database whose every byte goes through a counting relay."""
    from hcrepo import Settings

    with relay(migrated_db.app_url) as wire:
        db = Database(Settings(database_url=wire.url, redis_url="", pool_min=1, pool_max=1))
        with db:
            yield db, wire


def test_refusals_happen_before_any_byte_is_sent(
    wired: tuple[Database, Relay], clinic: Clinic
) -> None:
    db, wire = wired
    patient = clinic.patient_ids[0]
    wire.reset()
    with db.context(clinic_id=clinic.id):  # no actor
        with pytest.raises(ActorRequired, match="set_phone"):
            Clinical(db).set_phone(id=patient, phone="refused")
        with db.unit_of_work() as uow, pytest.raises(ActorRequired):
            Clinical(uow).set_phone(id=patient, phone="refused")
    with db.context(actor_id=clinic.actor_id):  # no clinic
        with pytest.raises(TenantContextMissing, match="patients"):
            Clinical(db).patients()
        with pytest.raises(TenantContextMissing):
            Clinical(db).stream_patients()
        with db.unit_of_work() as uow, pytest.raises(TenantContextMissing):
            Clinical(uow).set_phone(id=patient, phone="refused")
    assert wire.bytes_sent == 0
    # The wire is live: a call that is allowed does send.
    with db.context(clinic_id=clinic.id):
        assert len(Clinical(db).patients()) == 2
    assert wire.bytes_sent > 0


def test_a_plain_read_is_one_round_trip_in_one_transaction(
    wired: tuple[Database, Relay], clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    db, wire = wired
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        Session(db).probe()  # statements get prepared on first use: measure the steady state
        Clinical(db).patients()
        Clinical(db).set_phone(id=clinic.patient_ids[0], phone="+1 555 0105")
        calls_before = statement_calls(migrated_db)
        for _ in range(3):
            wire.reset()
            probe = Session(db).probe()
            assert wire.round_trips == 1
            # set_config(..., true) is transaction-local: the query sees it, so both ran in
            # the same (implicit) transaction.
            assert (probe.clinic, probe.actor) == (str(clinic.id), str(clinic.actor_id))
        wire.reset()
        assert [p.id for p in Clinical(db).patients()] == sorted(clinic.patient_ids)
        assert wire.round_trips == 1
        wire.reset()
        assert Clinical(db).set_phone(id=clinic.patient_ids[0], phone="+1 555 0106") == 1
        assert wire.round_trips == 1
        wire.reset()
        with db.unit_of_work() as uow:  # BEGIN + context + statement, then COMMIT
            Clinical(uow).patients()
        assert wire.round_trips == 2
    calls_after = statement_calls(migrated_db)
    assert calls_after["probe"] - calls_before["probe"] == 3
    # One set_config per statement: 3 probes, 1 read, 1 write, 1 unit of work.
    assert calls_after["set_config"] - calls_before["set_config"] == 6


def statement_calls(server: ServerDatabase) -> dict[str, int]:
    """pg_stat_statements call counts of the probe query and of the context prefix.

    The view is read from the maintenance database, so the schema under test gains nothing.
    """
    with psycopg.connect(server.server.superuser_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
            [server.dbname],
        ).fetchall()
    return {
        "probe": sum(c for q, c in rows if "hcrepo:probe" in q),
        "set_config": sum(c for q, c in rows if q.startswith("SELECT set_config(")),
    }
