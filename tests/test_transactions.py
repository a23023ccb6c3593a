"""`db.transaction` against the real primary: conflicts, write skew, deadlocks, killed
connections before and during COMMIT, and what is (not) retried.

The commit-time failures use a test table whose DEFERRABLE INITIALLY DEFERRED constraint
trigger runs while COMMIT is being processed: depending on the mark inserted, it fails, it
raises a serialization failure, or it waits for an advisory lock the test holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import pytest

from hcrepo import (
    CheckViolation,
    CommitOutcomeUnknown,
    Database,
    ExclusionViolation,
    HcrepoError,
    SerializationFailure,
    UniqueViolation,
    UnitOfWork,
    bind_context,
)
from hcrepo.healthcare import AppointmentRepository
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, MakeDatabase, Session, new_clinic

T = TypeVar("T")
WAIT = 10.0  # seconds any barrier or poll may take before the test fails

MARKS_DDL = """
CREATE TABLE hcrepo_test_marks (id bigserial PRIMARY KEY, mark text NOT NULL);
CREATE FUNCTION hcrepo_test_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.mark LIKE 'block:%' THEN
        PERFORM pg_advisory_xact_lock(hashtext(NEW.mark));
    ELSIF NEW.mark LIKE 'fail:%' THEN
        RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'check_violation';
    ELSIF NEW.mark LIKE 'serialize:%' THEN
        RAISE EXCEPTION 'conflict at commit' USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER hcrepo_test_at_commit AFTER INSERT ON hcrepo_test_marks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hcrepo_test_at_commit();
GRANT SELECT, INSERT ON hcrepo_test_marks TO hcrepo_app;
GRANT USAGE ON SEQUENCE hcrepo_test_marks_id_seq TO hcrepo_app;
"""



@pytest.fixture(scope="module")
def marks(migrated_db: ServerDatabase) -> Iterator[None]:
    """The test-only table of marks, created as the owner and dropped afterwards."""
    with psycopg.connect(migrated_db.owner_url, autocommit=True) as conn:
        conn.execute(MARKS_DDL)
    yield
    with psycopg.connect(migrated_db.owner_url, autocommit=True) as conn:
        conn.execute("DROP TABLE hcrepo_test_marks")
        conn.execute("DROP FUNCTION hcrepo_test_at_commit()")


@pytest.fixture
def superuser(migrated_db: ServerDatabase) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        yield conn


def terminate(superuser: psycopg.Connection[Any], pid: int) -> None:
    """End a backend and wait (up to 5 s, server side) until it is gone."""
    row = superuser.execute("SELECT pg_terminate_backend(%s, 5000)", [pid]).fetchone()
    assert row == (True,)


def mark_count(superuser: psycopg.Connection[Any], mark: str) -> int:
    row = superuser.execute("SELECT count(*) FROM hcrepo_test_marks WHERE mark = %s", [mark])
    found = row.fetchone()
    assert found is not None
    return int(found[0])


def in_threads(count: int, work: Callable[[int], T]) -> list[T | BaseException]:
    """Run work(0..count-1) in threads; each outcome is a value or the exception raised."""

    def outcome(n: int) -> T | BaseException:
        try:
            return work(n)
        except BaseException as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(outcome, range(count)))


# --- conflicts ----------------------------------------------------------------------------


def test_double_booking_twenty_callers_one_booking(
    make_db: MakeDatabase, clinic: Clinic
) -> None:
    db = make_db(pool_min=20, pool_max=20)
    slot = datetime(2031, 3, 3, 9, tzinfo=UTC)
    start = threading.Barrier(20)
    calls = Counter[int]()

    def book(uow: UnitOfWork, caller: int) -> UUID:
        calls[caller] += 1
        start.wait(WAIT)
        return AppointmentRepository(uow).book(
            patient_id=clinic.patient_ids[caller % 2], provider_id=clinic.provider_ids[0],
            starts_at=slot + timedelta(minutes=caller % 3), ends_at=slot + timedelta(minutes=30),
        ).id

    def caller(n: int) -> UUID:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            return db.transaction(book, caller=n, retries=3)

    outcomes = in_threads(20, caller)
    booked = [o for o in outcomes if isinstance(o, UUID)]
    conflicts = [o for o in outcomes if isinstance(o, ExclusionViolation)]
    assert len(booked) == 1, [type(o).__name__ for o in outcomes]
    assert len(conflicts) == 19, [type(o).__name__ for o in outcomes]
    for conflict in conflicts:
        assert conflict.sqlstate == "23P01"
        assert conflict.constraint == "appointments_no_double_booking"
        assert "appointments_no_double_booking" in str(conflict)
        assert conflict.attempts == 1
    # Bookings queue on the provider's row (sql/appointments.sql), so no two in-flight inserts
    # wait on each other in the exclusion check: no deadlock, nobody re-run.
    assert calls == Counter(range(20))
    with db.context(clinic_id=clinic.id):
        repo = Clinical(db)
        bookings = sum(
            repo.count_bookings(provider_id=clinic.provider_ids[0],
                                starts_at=slot + timedelta(minutes=m))
            for m in range(3)
        )
    assert bookings == 1


def test_unique_violation_is_not_retried(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    calls: list[int] = []

    def add(uow: UnitOfWork) -> UUID:
        calls.append(uow.backend_pid)
        return Clinical(uow).add_patient(clinic_id=clinic.id, mrn="unique-once")

    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        db.transaction(add)
        with pytest.raises(UniqueViolation) as caught:
            db.transaction(add, retries=5)
    assert len(calls) == 2
    assert caught.value.attempts == 1
    assert caught.value.sqlstate == "23505"
    assert "not retried after 1 attempt(s)" in str(caught.value)
    assert "unique-once" not in str(caught.value)  # values never reach messages


# --- serialization failures and deadlocks: retried to a correct result ---------------------


def on_call_doctors(
    db: Database, clinic: Clinic, isolation: str
) -> tuple[dict[UUID, int], int]:
    """Both on-call doctors try to go off call at once; attempts per doctor, and who is left.

    Each checks "at least two on call" and then takes itself off; the barrier makes both
    checks happen before either update, which is the classic write-skew interleaving.
    """
    checked = threading.Barrier(2)
    attempts = Counter[UUID]()

    def go_off_call(uow: UnitOfWork, doctor: UUID) -> None:
        attempts[doctor] += 1
        repo = Clinical(uow)
        on_call = repo.on_call_count()
        if attempts[doctor] == 1:
            checked.wait(WAIT)
        if on_call >= 2:
            repo.go_off_call(id=doctor)

    def doctor(n: int) -> None:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            db.transaction(go_off_call, doctor=clinic.provider_ids[n], retries=3,
                           isolation=isolation)

    outcomes = in_threads(2, doctor)
    assert outcomes == [None, None]
    with db.context(clinic_id=clinic.id):
        left = Clinical(db).on_call_count()
    return dict(attempts), left


def test_write_skew_is_retried_to_a_correct_result_under_serializable(
    make_db: MakeDatabase, migrated_db: ServerDatabase
) -> None:
    db = make_db()
    clinic = new_clinic(migrated_db.superuser_url, providers=2, on_call=True)
    attempts, left = on_call_doctors(db, clinic, "serializable")
    print(f"\nwrite skew (serializable): attempts per doctor {sorted(attempts.values())}")
    assert left == 1
    assert sorted(attempts.values()) == [1, 2]  # one serialization failure, one retry


def test_write_skew_happens_without_serializable(
    make_db: MakeDatabase, migrated_db: ServerDatabase
) -> None:
    """The control: the same interleaving under READ COMMITTED leaves nobody on call."""
    db = make_db()
    clinic = new_clinic(migrated_db.superuser_url, providers=2, on_call=True)
    attempts, left = on_call_doctors(db, clinic, "read_committed")
    print(f"\nwrite skew (read committed): attempts per doctor {sorted(attempts.values())}")
    assert left == 0
    assert sorted(attempts.values()) == [1, 1]


def test_deadlock_is_retried(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    locked = threading.Barrier(2)
    attempts = Counter[int]()
    first, second = clinic.patient_ids

    def cross(uow: UnitOfWork, order: int) -> None:
        attempts[order] += 1
        repo = Clinical(uow)
        mine, theirs = (first, second) if order == 0 else (second, first)
        repo.set_phone(id=mine, phone=f"by {order}")
        if attempts[order] == 1:
            locked.wait(WAIT)
        repo.set_phone(id=theirs, phone=f"by {order}")

    def worker(order: int) -> None:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            db.transaction(cross, order=order, retries=3)

    assert in_threads(2, worker) == [None, None]
    assert sorted(attempts.values()) == [1, 2]
    with db.context(clinic_id=clinic.id):
        phones = {Clinical(db).patient(id=p).phone for p in clinic.patient_ids}  # type: ignore[union-attr]
    assert len(phones) == 1  # both rows were last written by the same, retried, transaction


def test_serialization_failures_give_up_with_the_attempt_count(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"serialize:{uuid.uuid4()}"
    calls: list[int] = []

    def add(uow: UnitOfWork) -> None:
        calls.append(1)
        Session(uow).add_mark(mark=mark)

    with db.context(actor_id=uuid.uuid4()), pytest.raises(SerializationFailure) as caught:
        db.transaction(add, retries=2)
    assert len(calls) == 3
    assert caught.value.attempts == 3
    assert caught.value.sqlstate == "40001"
    assert "gave up after 3 attempt(s)" in str(caught.value)
    assert mark_count(superuser, mark) == 0


# --- broken connections --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before COMMIT", "between statements"])
def test_connection_killed_before_commit_is_retried_and_applied_once(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any], where: str
) -> None:
    db = make_db()
    mark = f"killed:{uuid.uuid4()}"
    pids: list[int] = []

    def add(uow: UnitOfWork) -> None:
        pids.append(uow.backend_pid)
        Session(uow).add_mark(mark=mark)
        if len(pids) == 1:
            terminate(superuser, uow.backend_pid)
            if where == "between statements":
                Session(uow).add_mark(mark="never reaches the server")

    with db.context(actor_id=uuid.uuid4()):
        db.transaction(add, retries=2)
    assert len(pids) == 2
    assert pids[0] != pids[1]  # the retry ran on a fresh connection
    assert mark_count(superuser, mark) == 1
    assert mark_count(superuser, "never reaches the server") == 0


def blocked_behind(superuser: psycopg.Connection[Any]) -> int:
    """The pid of the backend waiting for a lock this session holds (bounded polling)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        row = superuser.execute(
            "SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
        ).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.005)
    raise AssertionError("no backend started waiting for the test's lock")


def kill_during_commit(
    superuser: psycopg.Connection[Any], mark: str, run: Callable[[], object]
) -> tuple[BaseException | None, int]:
    """Run `run` in a thread; kill its backend while its COMMIT waits for our lock."""
    superuser.execute("SELECT pg_advisory_lock(hashtext(%s))", [mark])
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            run()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    try:
        pid = blocked_behind(superuser)
        terminate(superuser, pid)
    finally:
        superuser.execute("SELECT pg_advisory_unlock(hashtext(%s))", [mark])
        thread.join(WAIT)
    assert not thread.is_alive()
    return outcome[0], pid


def test_connection_lost_during_commit_is_outcome_unknown_and_not_retried(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"block:{uuid.uuid4()}"
    pids: list[int] = []
    hooks: list[str] = []

    def add(uow: UnitOfWork) -> None:
        pids.append(uow.backend_pid)
        Session(uow).add_mark(mark=mark)
        uow.after_commit(lambda: hooks.append("ran"))

    def run() -> None:
        with db.context(actor_id=uuid.uuid4()):
            db.transaction(add, retries=3)

    error, blocked_pid = kill_during_commit(superuser, mark, run)
    assert isinstance(error, CommitOutcomeUnknown), error
    assert "may or may not have been committed" in str(error)
    assert error.attempts == 1
    assert pids == [blocked_pid]  # fn ran exactly once, and it was that backend's COMMIT
    assert hooks == []
    assert mark_count(superuser, mark) == 0  # here the server never got to commit it


def test_a_plain_write_lost_during_its_commit_is_outcome_unknown(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    """An autocommit write commits at the Sync that ends its pipeline: same rule."""
    db = make_db()
    mark = f"block:{uuid.uuid4()}"

    def run() -> None:
        with db.context(actor_id=uuid.uuid4()):
            Session(db).add_mark(mark=mark)

    error, _ = kill_during_commit(superuser, mark, run)
    assert isinstance(error, CommitOutcomeUnknown), error
    assert mark_count(superuser, mark) == 0


def test_a_commit_the_server_refuses_is_a_plain_error(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    """An error answer to COMMIT means rolled back: the typed error, no hooks, no retry."""
    db = make_db()
    mark = f"fail:{uuid.uuid4()}"
    hooks: list[str] = []
    calls: list[int] = []

    def add(uow: UnitOfWork) -> None:
        calls.append(1)
        Session(uow).add_mark(mark=mark)
        uow.after_commit(lambda: hooks.append("ran"))

    with db.context(actor_id=uuid.uuid4()):
        with pytest.raises(CheckViolation) as caught:
            db.transaction(add, retries=3)
        with pytest.raises(CheckViolation):
            Session(db).add_mark(mark=mark)  # the plain write's implicit COMMIT, too
    assert caught.value.attempts == 1
    assert (calls, hooks) == ([1], [])
    assert mark_count(superuser, mark) == 0


def test_a_failing_after_commit_hook_does_not_rerun_committed_work(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"hooked:{uuid.uuid4()}"
    calls: list[int] = []

    def add(uow: UnitOfWork) -> None:
        calls.append(1)
        Session(uow).add_mark(mark=mark)

        def hook() -> None:
            raise SerializationFailure("40001 from a hook", sqlstate="40001")

        uow.after_commit(hook)

    with db.context(actor_id=uuid.uuid4()), pytest.raises(SerializationFailure):
        db.transaction(add, retries=3)
    assert calls == [1]
    assert mark_count(superuser, mark) == 1


# --- joining an open unit of work -----------------------------------------------------------


def test_transaction_inside_a_unit_of_work_joins_it(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"joined:{uuid.uuid4()}"
    seen: list[tuple[UnitOfWork, int]] = []

    def add(uow: UnitOfWork) -> None:
        seen.append((uow, uow.backend_pid))
        Session(uow).add_mark(mark=mark)

    def fail(uow: UnitOfWork) -> None:
        seen.append((uow, uow.backend_pid))
        raise SerializationFailure("40001 inside a joined transaction", sqlstate="40001")

    with db.context(actor_id=uuid.uuid4()):
        with db.unit_of_work() as outer:
            db.transaction(add, retries=3)
            assert mark_count(superuser, mark) == 0  # joined: no commit of its own
            with pytest.raises(SerializationFailure):
                db.transaction(fail, retries=3)  # the owner retries, not the joined call
            assert seen == [(outer, outer.backend_pid)] * 2
        assert mark_count(superuser, mark) == 1
        with pytest.raises(RuntimeError), db.unit_of_work():
            db.transaction(add)
            raise RuntimeError("the owner rolls back")
    assert mark_count(superuser, mark) == 1


def test_a_unit_of_work_belongs_to_its_thread(make_db: MakeDatabase, clinic: Clinic) -> None:
    db = make_db()
    with db.context(clinic_id=clinic.id), db.unit_of_work() as uow:
        Clinical(uow).patients()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(Clinical(uow).patients)
            with pytest.raises(HcrepoError, match="thread that opened it"):
                future.result(WAIT)
        assert len(Clinical(uow).patients()) == 2


def test_transaction_in_another_thread_runs_its_own(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    """A task handed to a pool with bind_context cannot share the caller's connection."""
    db = make_db()
    mark = f"worker:{uuid.uuid4()}"

    def add(uow: UnitOfWork) -> int:
        Session(uow).add_mark(mark=mark)
        return uow.backend_pid

    with db.context(actor_id=uuid.uuid4()), db.unit_of_work() as outer:
        Session(outer).count_marks(mark=mark)
        with ThreadPoolExecutor(1) as pool:
            worker_pid = pool.submit(bind_context(db.transaction), add).result(WAIT)
        assert worker_pid != outer.backend_pid
        assert mark_count(superuser, mark) == 1  # committed on its own, before the outer


def test_units_closed_out_of_order_are_never_joined(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"out-of-order:{uuid.uuid4()}"
    first, second = db.unit_of_work(), db.unit_of_work()
    with db.context(actor_id=uuid.uuid4()):
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # the ambient unit now points at the closed first
        db.transaction(lambda uow: Session(uow).add_mark(mark=mark))
    assert mark_count(superuser, mark) == 1


def test_the_decorator_form_retries_like_transaction(
    make_db: MakeDatabase, marks: None, superuser: psycopg.Connection[Any]
) -> None:
    db = make_db()
    mark = f"decorated:{uuid.uuid4()}"
    pids: list[int] = []

    @db.transactional(retries=2, isolation="serializable")
    def add(uow: UnitOfWork, *, mark: str) -> str:
        pids.append(uow.backend_pid)
        Session(uow).add_mark(mark=mark)
        if len(pids) == 1:
            terminate(superuser, uow.backend_pid)
        return Session(uow).probe().isolation

    with db.context(actor_id=uuid.uuid4()):
        assert add(mark=mark) == "serializable"
    assert len(pids) == 2
    assert mark_count(superuser, mark) == 1
