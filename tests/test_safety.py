"""Paths by which a call could run as the wrong clinic, write twice, or leave a connection or
a stream in a bad state: generators, thread pools, WSGI threads, nested transactions, writes
beside a unit of work, savepoints, reads that write, and streams that fail or run long."""

from __future__ import annotations

import contextlib
import http.client
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg
import pytest

from hcrepo import (
    DatabaseError,
    InvalidContext,
    Repository,
    TenantContextMissing,
    UnitOfWork,
    WriteOutsideUnitOfWork,
    bind_context,
    query,
)
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, MakeDatabase, PatientRow, new_clinic
from tests.support.wsgi import served

WAIT = 10.0


class Safety(Repository, sql="sql/safety.sql", tenant=False):
    @query("sneaky_insert")
    def sneaky_insert(self, *, mark: str) -> int: ...

    @query("count_marks")
    def count_marks(self, *, mark: str) -> int: ...

    @query("add_mark")
    def add_mark(self, *, mark: str) -> int: ...

    @query("numbers")
    def numbers(self, *, upto: int) -> Iterator[int]: ...

    @query("failing_stream")
    def failing_stream(self) -> Iterator[int]: ...

    @query("slow_stream")
    def slow_stream(self) -> Iterator[int]: ...


@pytest.fixture(scope="module")
def safety_schema(migrated_db: ServerDatabase) -> None:
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS safety_marks (mark text NOT NULL)")
        conn.execute("GRANT SELECT, INSERT ON safety_marks TO hcrepo_app")
        conn.execute(
            "CREATE OR REPLACE FUNCTION safety_insert(mark text) RETURNS int VOLATILE "
            "LANGUAGE sql AS $$ INSERT INTO safety_marks (mark) VALUES (mark) RETURNING 1 $$"
        )


@pytest.fixture(scope="module")
def two(migrated_db: ServerDatabase) -> tuple[Clinic, Clinic]:
    return (new_clinic(migrated_db.superuser_url, patients=2),
            new_clinic(migrated_db.superuser_url, patients=1))


def ids(rows: list[PatientRow]) -> set[UUID]:
    return {row.id for row in rows}


def mark() -> str:
    return uuid.uuid4().hex


# --- a context belongs to its block, not to whoever runs next -------------------------------


def test_a_suspended_generators_context_stays_with_the_generator(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, b = two

    def rows_of_a() -> Iterator[set[UUID]]:
        with db.context(clinic_id=a.id):
            yield ids(Clinical(db).patients())
            yield ids(Clinical(db).patients())

    gen = rows_of_a()
    assert next(gen) == set(a.patient_ids)
    with pytest.raises(TenantContextMissing):
        Clinical(db).patients()  # the consumer is in no block at all
    with db.context(clinic_id=b.id):
        assert ids(Clinical(db).patients()) == set(b.patient_ids)
        assert next(gen) == set(a.patient_ids)  # resumed: its own block applies to it
        assert ids(Clinical(db).patients()) == set(b.patient_ids)
    gen.close()
    with pytest.raises(TenantContextMissing):
        Clinical(db).patients()


def test_a_thread_pool_worker_hands_no_context_to_its_next_task(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    kept: list[Any] = []

    def leaves_a_behind() -> set[UUID]:
        def rows() -> Iterator[set[UUID]]:
            with db.context(clinic_id=a.id):
                yield ids(Clinical(db).patients())

        gen = rows()
        kept.append(gen)  # suspended inside its block when the task ends
        block = db.context(clinic_id=a.id)
        block.__enter__()  # and a block entered but never left
        kept.append(block)
        return next(gen)

    with ThreadPoolExecutor(1) as pool:  # one worker: the next task runs on the same thread
        assert pool.submit(leaves_a_behind).result(WAIT) == set(a.patient_ids)
        with pytest.raises(TenantContextMissing):
            pool.submit(lambda: Clinical(db).patients()).result(WAIT)


def test_a_wsgi_thread_hands_no_context_to_its_next_request(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    kept: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/leak":
            def rows() -> Iterator[int]:
                with db.context(clinic_id=a.id):
                    yield len(Clinical(db).patients())

            gen = rows()
            kept.append(gen)
            body = str(next(gen)).encode()
        else:
            try:
                body = str(len(Clinical(db).patients())).encode()
            except TenantContextMissing:
                body = b"refused"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    replies = []
    with served(app, threads=1) as port:  # the second request on the first one's thread
        for path in ("/leak", "/read"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            conn.request("GET", path)
            replies.append(conn.getresponse().read())
            conn.close()
    assert replies == [str(len(a.patient_ids)).encode(), b"refused"]


def test_context_manager_helpers_pass_the_context_to_their_body(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, b = two

    @contextlib.contextmanager
    def as_clinic(clinic: Clinic) -> Iterator[None]:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            yield

    with as_clinic(a):
        assert ids(Clinical(db).patients()) == set(a.patient_ids)
        with as_clinic(b):
            assert ids(Clinical(db).patients()) == set(b.patient_ids)
        assert ids(Clinical(db).patients()) == set(a.patient_ids)
    with contextlib.ExitStack() as stack:
        stack.enter_context(db.context(clinic_id=b.id))
        assert ids(Clinical(db).patients()) == set(b.patient_ids)
    with pytest.raises(TenantContextMissing):
        Clinical(db).patients()


# --- nested transactions and writes beside a unit of work -----------------------------------


def test_a_nested_transaction_for_another_clinic_is_refused(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, b = two

    def patients(uow: UnitOfWork) -> set[UUID]:
        return ids(Clinical(uow).patients())

    with db.context(clinic_id=a.id, actor_id=a.actor_id), db.unit_of_work() as uow:
        assert db.transaction(patients) == set(a.patient_ids)  # same context: joins
        with pytest.raises(InvalidContext, match="clinic_id"):
            db.transaction(patients, clinic_id=b.id)
        with pytest.raises(InvalidContext, match="actor_id"):
            db.transaction(patients, actor_id=uuid.uuid4())
        with pytest.raises(InvalidContext, match="isolation"):
            db.transaction(patients, isolation="serializable")
        with pytest.raises(InvalidContext, match="read_only"):
            db.transaction(patients, read_only=True)
        with pytest.raises(InvalidContext, match="clinic_id"):
            db.for_each_clinic(lambda clinic_id: db.transaction(patients))
        assert ids(Clinical(uow).patients()) == set(a.patient_ids)


@pytest.mark.parametrize(("options", "error"), [
    ({"clinic_id": "not-a-uuid"}, InvalidContext),
    ({"actor_id": 42}, InvalidContext),
    ({"isolation": "chaos"}, ValueError),
    ({"isolation": 3}, ValueError),
])
def test_bad_transaction_options_are_refused_before_anything_runs(
    make_db: MakeDatabase, options: dict[str, Any], error: type[Exception]
) -> None:
    db = make_db()
    ran: list[int] = []
    with pytest.raises(error):
        db.transaction(lambda uow: ran.append(1), **options)
    assert ran == []


def test_a_write_through_db_inside_a_unit_of_work_is_refused(
    make_db: MakeDatabase, safety_schema: None, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    first, second = mark(), mark()
    attempts: list[int] = []

    def work(uow: UnitOfWork) -> None:
        attempts.append(1)
        Safety(uow).add_mark(mark=first)
        Safety(db).add_mark(mark=second)  # would commit on its own, once per attempt

    with db.context(actor_id=a.actor_id):
        with pytest.raises(WriteOutsideUnitOfWork, match=r"Safety\.add_mark"):
            db.transaction(work, retries=3)
        with pytest.raises(WriteOutsideUnitOfWork), ThreadPoolExecutor(1) as pool, \
                db.unit_of_work():
            pool.submit(bind_context(lambda: Safety(db).add_mark(mark=second))).result(WAIT)
        assert Safety(db).count_marks(mark=first) == 0
        assert Safety(db).count_marks(mark=second) == 0
        with db.unit_of_work() as uow:
            Safety(uow).add_mark(mark=first)
            with db.autonomous():
                assert Safety(db).add_mark(mark=second) == 1  # deliberately its own commit
        assert Safety(db).count_marks(mark=first) == 1
        assert Safety(db).count_marks(mark=second) == 1
        assert Safety(db).add_mark(mark=second) == 1  # outside the unit: a plain write again
    assert attempts == [1]


def test_after_commit_hooks_of_a_rolled_back_savepoint_do_not_fire(
    make_db: MakeDatabase, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    fired: list[str] = []
    with db.context(clinic_id=a.id, actor_id=a.actor_id), db.unit_of_work() as uow:
        uow.after_commit(lambda: fired.append("kept"))
        with pytest.raises(LookupError), uow.savepoint():
            Clinical(uow).set_phone(id=a.patient_ids[0], phone="+1 555 0142")
            uow.after_commit(lambda: fired.append("rolled back"))
            raise LookupError("roll back to the savepoint")
        with uow.savepoint():
            uow.after_commit(lambda: fired.append("released"))
    assert fired == ["kept", "released"]


# --- reads cannot write ----------------------------------------------------------------------


def test_a_read_that_writes_through_a_function_fails_and_writes_nothing(
    make_db: MakeDatabase, safety_schema: None, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    sneaky = mark()
    with db.context(actor_id=a.actor_id):
        with pytest.raises(DatabaseError, match="-- kind: write") as failure:
            Safety(db).sneaky_insert(mark=sneaky)
        assert failure.value.sqlstate == "25006"
        assert sneaky not in str(failure.value)
        assert Safety(db).count_marks(mark=sneaky) == 0


# --- streams ---------------------------------------------------------------------------------


def prepared_statements(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert row is not None
    return int(row[0])


def test_streams_leave_no_prepared_statements_behind(
    make_db: MakeDatabase, safety_schema: None
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    assert list(Safety(db).numbers(upto=3)) == [1, 2, 3]  # prepares what every stream shares
    with db._router.primary.connection() as conn:
        before = prepared_statements(conn)
    for _ in range(40):
        assert list(Safety(db).numbers(upto=3)) == [1, 2, 3]
    with db._router.primary.connection() as conn:
        assert prepared_statements(conn) == before


def test_a_stream_failing_midway_raises_the_cause_and_leaves_a_clean_connection(
    make_db: MakeDatabase, safety_schema: None, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    a, _ = two
    with pytest.raises(DatabaseError) as failure:
        list(Safety(db).failing_stream())
    assert failure.value.sqlstate == "22012"  # division_by_zero, not a cleanup error
    assert list(Safety(db).numbers(upto=2)) == [1, 2]
    with db.context(actor_id=a.actor_id), pytest.raises(DatabaseError) as in_unit, \
            db.unit_of_work() as uow:
        list(Safety(uow).failing_stream())
    assert in_unit.value.sqlstate == "22012"
    with db._router.primary.connection() as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_streams_timeout_applies_inside_a_unit_of_work(
    make_db: MakeDatabase, safety_schema: None, two: tuple[Clinic, Clinic]
) -> None:
    db = make_db()
    a, _ = two
    with pytest.raises(DatabaseError) as outside:
        list(Safety(db).slow_stream())
    assert outside.value.sqlstate == "57014"  # query_canceled by statement_timeout
    with db.context(actor_id=a.actor_id), pytest.raises(DatabaseError) as inside, \
            db.unit_of_work() as uow:
        list(Safety(uow).slow_stream())
    assert inside.value.sqlstate == "57014"
