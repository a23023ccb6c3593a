"""The PHI access log against real servers: what each phi=True call records (fields, patient
ids, who answered: the primary, a replica or the cache), streams consumed elsewhere or
dropped, and that no row is lost on close. Outages and crashes: tests/test_access_log_loss.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from hcrepo import Database, Repository, SqlFileError, query
from hcrepo.compliance import access_log
from hcrepo.healthcare import (
    AppointmentRepository,
    PatientRepository,
    ProviderRepository,
)
from hcrepo.ops import metrics
from hcrepo.testing import PostgresServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import WaitReplayed
from tests.support.access_log import Logged, logged, wait_logged
from tests.support.cache import CachedDatabase
from tests.support.repos import Clinic, MakeDatabase, PatientRow, new_clinic
from tests.support.routing import LogSink


@pytest.fixture
def clinic3(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, providers=1, patients=3)


def _rows(migrated_db: ServerDatabase, clinic: Clinic) -> list[Logged]:
    return logged(migrated_db.superuser_url, clinic.id)


def test_a_primary_read_is_logged_with_every_field(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    before = time.time()
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        found = PatientRepository(db).search(limit=10)
    after = time.time()
    db.close()  # flushes

    [row] = _rows(migrated_db, clinic3)
    assert row.query == "search_patients"
    assert row.clinic_id == clinic3.id
    assert row.actor_id == clinic3.actor_id
    assert row.source == "primary"
    assert sorted(row.patient_ids) == sorted(clinic3.patient_ids) == sorted(p.id for p in found)
    assert before - 0.01 <= row.recorded_at <= after + 0.01
    assert row.recorded_at <= row.logged_at + 0.5  # client clock close to the server's
    assert row.staff_role is None and row.emergency_reason is None


def test_the_staff_role_and_a_break_glass_reason_are_logged(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id, role="doctor",
                    emergency_reason="cardiac arrest in the waiting room"):
        PatientRepository(db).search(limit=10)
    db.close()  # flushes

    [row] = _rows(migrated_db, clinic3)
    assert (row.staff_role, row.emergency_reason) == ("doctor",
                                                      "cardiac arrest in the waiting room")


def test_patient_ids_of_single_list_none_and_rowcount_results(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    first, second, third = clinic3.patient_ids
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        patients = PatientRepository(db)
        one = patients.get(id=first)  # no Redis here: read from the primary
        assert one is not None
        patients.get(id=uuid4())  # None
        patients.page(limit=2)  # a list, two of three
        # A list of rows with a patient_id field, empty: the argument names the patient.
        AppointmentRepository(db).for_patient(patient_id=second, since=datetime(2000, 1, 1))
        # A rowcount: the patient is the declared argument (patient_id_param="id").
        assert patients.update_contact(id=third, phone="555-0100", email=None,
                                       address=None) == 1
        # A rowcount of a write about an appointment: no patient can be told without a read.
        AppointmentRepository(db).cancel(id=uuid4())
    db.close()

    by_query = {row.query: row for row in _rows(migrated_db, clinic3)}
    assert len(_rows(migrated_db, clinic3)) == 6
    gets = [row for row in _rows(migrated_db, clinic3) if row.query == "get_patient"]
    assert [row.patient_ids for row in gets] == [[first], []]
    assert len(by_query["page_patients"].patient_ids) == 2
    assert set(by_query["page_patients"].patient_ids) <= set(clinic3.patient_ids)
    assert by_query["patient_appointments"].patient_ids == [second]
    assert by_query["update_patient_contact"].patient_ids == [third]
    assert by_query["cancel_appointment"].patient_ids == []
    assert {row.source for row in _rows(migrated_db, clinic3)} == {"primary"}


def test_non_phi_queries_are_not_logged(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        assert PatientRepository(db).count() == 3
        ProviderRepository(db).find()
    db.close()
    assert _rows(migrated_db, clinic3) == []


def test_off_records_nothing(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db(access_log=False)
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        assert len(PatientRepository(db).search()) == 3
    db.close()
    assert _rows(migrated_db, clinic3) == []


def test_a_replica_read_names_the_replica(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic,
    pg_replicas: list[PostgresServer], wait_replayed: WaitReplayed,
) -> None:
    for replica in pg_replicas:
        wait_replayed(replica)  # the clinic's rows are on both
    db = make_db(read_replica_urls=[migrated_db.replica_app_url(r) for r in pg_replicas])
    served = {node.name: node.served.value for node in db._router.replicas}
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        for _ in range(4):
            assert len(PatientRepository(db).search()) == 3
    db.close()

    rows = _rows(migrated_db, clinic3)
    assert len(rows) == 4
    by_node = {name: db._router.replicas[int(name[-1]) - 1].served.value - count
               for name, count in served.items()}
    assert {row.source for row in rows} == {f"replica:{name}" for name, n in by_node.items()
                                            if n}
    for name, count in by_node.items():
        assert sum(row.source == f"replica:{name}" for row in rows) == count
    assert all(sorted(row.patient_ids) == sorted(clinic3.patient_ids) for row in rows)


def test_a_cached_read_is_logged_as_the_cache(
    cached_db: CachedDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = cached_db()
    pid = clinic3.patient_ids[0]
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        patients = PatientRepository(db)
        filled = patients.get(id=pid)
        hit = patients.get(id=pid)
    assert filled == hit
    db.close()
    assert [(row.source, row.patient_ids) for row in _rows(migrated_db, clinic3)] == [
        ("primary", [pid]), ("cache", [pid]),
    ]


@pytest.mark.parametrize("replicas", [False, True])
def test_a_stream_consumed_in_another_thread_is_logged_with_the_calls_context(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic, replicas: bool,
    pg_replicas: list[PostgresServer], wait_replayed: WaitReplayed,
) -> None:
    options: dict[str, Any] = {}
    if replicas:
        for replica in pg_replicas:
            wait_replayed(replica)
        options["read_replica_urls"] = [migrated_db.replica_app_url(r) for r in pg_replicas]
    db = make_db(**options)
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        rows = PatientRepository(db).stream_all()
    consumed: list[UUID] = []
    # Another thread, in a context of its own: the call's context is what is recorded.
    other = new_clinic(migrated_db.superuser_url, patients=0)

    def consume() -> None:
        with db.context(clinic_id=other.id, actor_id=other.actor_id):
            consumed.extend(patient.id for patient in rows)

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join(30)
    db.close()

    [row] = _rows(migrated_db, clinic3)
    assert (row.query, row.clinic_id, row.actor_id) == (
        "stream_patients", clinic3.id, clinic3.actor_id)
    assert sorted(row.patient_ids) == sorted(consumed) == sorted(clinic3.patient_ids)
    assert row.source.startswith("replica:") if replicas else row.source == "primary"
    assert _rows(migrated_db, other) == []


def test_a_stream_dropped_midway_records_what_it_yielded(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        closed = PatientRepository(db).stream_all()
        first = next(closed).id
        closed.close()
        collected = PatientRepository(db).stream_all()
        two = [next(collected).id, next(collected).id]
        del collected  # dropped without close: recorded when collected
        never = PatientRepository(db).stream_all()
        del never  # never started: no query was sent, nothing was read
    db.close()
    assert sorted(tuple(row.patient_ids) for row in _rows(migrated_db, clinic3)) == sorted(
        [(first,), tuple(two)])


def test_a_long_stream_is_recorded_while_it_is_consumed(
    make_db: MakeDatabase, migrated_db: ServerDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = new_clinic(migrated_db.superuser_url, patients=5)
    monkeypatch.setattr(access_log, "STREAM_IDS_PER_ROW", 2)
    db = make_db(access_log_flush_interval=0.05)
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        rows = PatientRepository(db).stream_all()
        seen = [next(rows).id for _ in range(3)]
        # Two ids were recorded while the stream is still open.
        [early] = wait_logged(migrated_db.superuser_url, clinic.id, 1)
        assert early.patient_ids == seen[:2]
        seen.extend(patient.id for patient in rows)
    db.close()
    recorded = [pid for row in logged(migrated_db.superuser_url, clinic.id)
                for pid in row.patient_ids]
    assert recorded == seen and sorted(seen) == sorted(clinic.patient_ids)


def test_a_unit_of_work_logs_its_phi_calls_from_the_primary(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    pid = clinic3.patient_ids[0]
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id), \
            db.unit_of_work() as uow:
        PatientRepository(uow).get(id=pid)
        streamed = [p.id for p in PatientRepository(uow).stream_all()]
        PatientRepository(uow).rename(id=pid, first_name="Renamed", last_name="Patient")
    db.close()
    rows = {row.query: row for row in _rows(migrated_db, clinic3)}
    assert rows["get_patient"].patient_ids == [pid]
    assert sorted(rows["stream_patients"].patient_ids) == sorted(streamed)
    assert rows["update_patient_name"].patient_ids == [pid]
    assert {row.source for row in rows.values()} == {"primary"}


def test_close_writes_every_row_recorded_by_many_threads(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db(access_log_flush_interval=3600, access_log_batch_rows=1_000_000, pool_max=8)
    threads, reads = 4, 150
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait(30)
        with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
            patients = PatientRepository(db)
            for n in range(reads):
                patients.get(id=clinic3.patient_ids[n % 3])

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert _rows(migrated_db, clinic3) == []  # nothing written before close
    db.close()
    rows = _rows(migrated_db, clinic3)
    assert len(rows) == threads * reads
    assert {row.patient_ids[0] for row in rows} == set(clinic3.patient_ids)


def test_a_full_batch_is_written_without_waiting_for_the_interval(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db(access_log_flush_interval=3600, access_log_batch_rows=5)
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        for _ in range(5):
            PatientRepository(db).get(id=clinic3.patient_ids[0])
    assert len(wait_logged(migrated_db.superuser_url, clinic3.id, 5)) == 5
    db.close()


def test_write_failures_are_counted_and_logged_without_values_and_the_rows_kept(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic,
    log_sink: Any,
) -> None:
    logs: LogSink = log_sink("DEBUG")
    pid = clinic3.patient_ids[0]
    constraint = f"refuse_{uuid4().hex[:8]}"
    # The server's error for a refused row quotes the row (patient ids included).
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE audit.access_log ADD CONSTRAINT {constraint} "
                     f"CHECK (NOT patient_ids @> ARRAY['{pid}'::uuid])")
    errors = metrics.ACCESS_LOG_ERRORS.labels(kind="write")
    failed_before = errors._value.get()
    refused = logs.event("cannot write to the primary")
    resumed = logs.event("the primary takes rows again")
    db = make_db(access_log_flush_interval=0.05)
    try:
        with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
            patient = PatientRepository(db).get(id=pid)  # answered all the same
            assert patient is not None and patient.id == pid
        assert refused.wait(30)
    finally:
        with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE audit.access_log DROP CONSTRAINT {constraint}")
    assert resumed.wait(30)
    db.close()
    assert errors._value.get() > failed_before
    [row] = _rows(migrated_db, clinic3)  # kept, and written once the table took it
    assert row.patient_ids == [pid]
    text = "\n".join(logs.messages)
    assert "SQLSTATE 23514" in text
    for value in (str(pid), str(clinic3.id), str(clinic3.actor_id), pid.hex):
        assert value not in text


class Declared(Repository, sql="sql/clinical.sql"):
    @query("patients", phi=True, patient_id_field="id")
    def patients(self) -> list[PatientRow]: ...

    @query("set_phone", phi=True, patient_id_param="id")
    def set_phone(self, *, id: UUID, phone: str) -> int: ...

    @query("stream_patients", phi=True, patient_id_field="id")
    def stream(self) -> Iterator[PatientRow]: ...


def test_declared_fields_and_parameters(
    make_db: MakeDatabase, migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    db = make_db()
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        Declared(db).patients()
        Declared(db).set_phone(id=clinic3.patient_ids[1], phone="555-0101")
        list(Declared(db).stream())
    db.close()
    rows = {row.query: row.patient_ids for row in _rows(migrated_db, clinic3)}
    assert sorted(rows["patients"]) == sorted(clinic3.patient_ids)
    assert rows["set_phone"] == [clinic3.patient_ids[1]]
    assert sorted(rows["stream_patients"]) == sorted(clinic3.patient_ids)


@pytest.mark.parametrize(("options", "message"), [
    ({"patient_id_field": "nope"}, "patient_id_field='nope' is not a field"),
    ({"patient_id_param": "nope"}, "patient_id_param='nope' is not a parameter"),
    ({"phi": False, "patient_id_field": "id"}, "need phi=True"),
])
def test_bad_declarations_are_refused_when_the_class_is_defined(
    options: dict[str, Any], message: str
) -> None:
    spec: dict[str, Any] = {"phi": True, **options}
    with pytest.raises(SqlFileError, match=message):
        class Bad(Repository, sql="sql/clinical.sql"):
            @query("patient", **spec)
            def patient(self, *, id: UUID) -> PatientRow | None: ...


def test_phi_on_a_repository_without_clinics_is_refused() -> None:
    with pytest.raises(SqlFileError, match="phi=True on a repository defined with tenant=False"):
        class Untenanted(Repository, sql="sql/clinical.sql", tenant=False):
            @query("patients", phi=True)
            def patients(self) -> list[PatientRow]: ...


def test_a_database_that_is_never_opened_logs_too(
    migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    from hcrepo import Settings

    db = Database(Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1))
    with db.context(clinic_id=clinic3.id, actor_id=clinic3.actor_id):
        PatientRepository(db).search()
    db.close()
    assert len(_rows(migrated_db, clinic3)) == 1


def test_records_racing_close_are_all_written_and_close_never_hangs(
    migrated_db: ServerDatabase, clinic3: Clinic
) -> None:
    from hcrepo import Settings
    from hcrepo.compliance.access_log import AccessLog
    from hcrepo.tenancy import Context

    log = AccessLog(Settings(database_url=migrated_db.app_url, access_log_flush_interval=0.01,
                             access_log_batch_rows=7))
    patients = PatientRepository.__plans__["get"].patients
    assert patients is not None
    context = Context(clinic3.id, clinic3.actor_id)
    threads, records = 4, 300
    start = threading.Barrier(threads + 1)

    def record() -> None:
        start.wait(30)
        for n in range(records):
            log.seen(patients, context, (clinic3.patient_ids[0],), None, f"replica:r{n % 2}")

    workers = [threading.Thread(target=record) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait(30)
    for _ in range(5):  # closes while records land: each may start a new writer
        log.close()
    for worker in workers:
        worker.join(60)
    log.close()
    assert not any(worker.is_alive() for worker in workers)
    rows = _rows(migrated_db, clinic3)
    assert len(rows) == threads * records
    assert {row.source for row in rows} == {"replica:r0", "replica:r1"}
