"""What the PHI access log loses, against real servers: nothing in a 10-second primary outage
(memory, then the spill file), nothing a killed process had spilled (written at the next
start), and after `kill -9` at most one flush interval of rows (measured, printed).

The outage tests stop a primary of their own (the session's is shared); reads go on through
the cache meanwhile, as they would in production while the primary restarts.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hcrepo import Database, Settings
from hcrepo.healthcare import PatientRepository
from hcrepo.ops import metrics
from hcrepo.testing import PostgresServer, RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import bootstrap_database, migrate_database
from tests.support.access_log import Worker, logged, wait_logged
from tests.support.cache import ENCRYPTION_KEY
from tests.support.repos import new_clinic
from tests.support.routing import LogSink

OUTAGE_SECONDS = 10.0
MAX_OUTAGE_READS = 20_000  # enough to overflow memory many times; keeps the spill file small


@pytest.fixture(scope="module")
def own_primary() -> Iterator[ServerDatabase]:
    """A migrated database on a primary of this module's own, which the tests stop."""
    with PostgresServer() as server:
        db = bootstrap_database(server, "hcrepo_access_loss")
        migrate_database(db)
        yield db


def _settings(db: ServerDatabase, redis: RedisServer, spill: Path, **extra: Any) -> dict[str, Any]:
    return {
        "database_url": db.app_url, "redis_url": redis.url,
        "cache_key_prefix": f"t{uuid.uuid4().hex[:10]}", "cache_encryption_key": ENCRYPTION_KEY,
        "access_log_spill_dir": str(spill), "pool_min": 1, "pool_max": 2,
        "health_interval": 60.0, **extra,
    }


def _spill_files(spill: Path) -> list[Path]:
    return sorted(spill.glob("*.spill")) if spill.exists() else []


def test_a_ten_second_primary_outage_loses_no_row(
    own_primary: ServerDatabase, redis_server: RedisServer, tmp_path: Path, log_sink: Any
) -> None:
    logs: LogSink = log_sink("INFO")
    clinic = new_clinic(own_primary.superuser_url, patients=1)
    [pid] = clinic.patient_ids
    spill = tmp_path / "spill"
    spilled = metrics.ACCESS_LOG_ROWS.labels(outcome="spilled")
    spilled_before = spilled._value.get()
    db = Database(Settings(**_settings(own_primary, redis_server, spill,
                                       access_log_flush_interval=0.2,
                                       access_log_max_buffered=500)))
    db.open()
    down = logs.event("access log: cannot write to the primary")
    back = logs.event("access log: the primary takes rows again")
    reads = 0
    try:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            patients = PatientRepository(db)
            patients.get(id=pid)  # fills the cache from the primary
            assert len(wait_logged(own_primary.superuser_url, clinic.id, 1)) == 1
            own_primary.server.stop()
            try:
                ends = time.monotonic() + OUTAGE_SECONDS
                while time.monotonic() < ends and reads < MAX_OUTAGE_READS:
                    assert patients.get(id=pid) is not None  # from the cache
                    reads += 1
                assert down.wait(30), "the writer never found the primary down"
                threading.Event().wait(max(0.0, ends - time.monotonic()))  # the rest of it
                # Memory overflowed to the spill file: 0600, in a 0700 directory.
                assert spilled._value.get() > spilled_before
                [spill_file] = _spill_files(spill)
                assert stat.S_IMODE(spill_file.stat().st_mode) == 0o600
                assert stat.S_IMODE(spill.stat().st_mode) == 0o700
                assert str(pid) in spill_file.read_text()
            finally:
                own_primary.server.start()
            assert back.wait(30), "the writer did not resume"
            rows = wait_logged(own_primary.superuser_url, clinic.id, reads + 1)
    finally:
        db.close()
    rows = logged(own_primary.superuser_url, clinic.id)
    assert len(rows) == reads + 1, f"{reads + 1 - len(rows)} of {reads + 1} rows lost"
    assert [row.source for row in rows] == ["primary"] + ["cache"] * reads
    assert all(row.patient_ids == [pid] for row in rows)
    assert _spill_files(spill) == []  # written, then removed


def test_close_while_the_primary_is_down_spills_and_the_next_start_writes(
    own_primary: ServerDatabase, redis_server: RedisServer, tmp_path: Path
) -> None:
    clinic = new_clinic(own_primary.superuser_url, patients=1)
    [pid] = clinic.patient_ids
    spill = tmp_path / "spill"
    settings = _settings(own_primary, redis_server, spill, access_log_flush_interval=3600)
    db = Database(Settings(**settings))
    db.open()
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        PatientRepository(db).get(id=pid)
    own_primary.server.stop()
    try:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            for _ in range(50):
                PatientRepository(db).get(id=pid)
        db.close()  # the primary cannot take them: spilled
        assert len(_spill_files(spill)) == 1
    finally:
        own_primary.server.start()
    assert logged(own_primary.superuser_url, clinic.id) == []
    again = Database(Settings(**{**settings, "access_log_flush_interval": 0.1}))
    again.open()
    try:
        assert len(wait_logged(own_primary.superuser_url, clinic.id, 51)) == 51
    finally:
        again.close()
    assert len(logged(own_primary.superuser_url, clinic.id)) == 51
    assert _spill_files(spill) == []


def test_a_spill_file_left_by_a_killed_process_is_written_at_the_next_start(
    own_primary: ServerDatabase, redis_server: RedisServer, tmp_path: Path
) -> None:
    clinic = new_clinic(own_primary.superuser_url, patients=1)
    [pid] = clinic.patient_ids
    spill = tmp_path / "spill"
    # Every batch the primary refuses goes to disk at once (nothing held in memory).
    settings = _settings(own_primary, redis_server, spill, access_log_flush_interval=0.1,
                         access_log_max_buffered=0)
    worker = Worker(settings, clinic.id, clinic.actor_id, pid, tmp_path / "counter")
    try:
        worker.send("reads 1")  # fills the cache
        worker.expect("done")
        assert len(wait_logged(own_primary.superuser_url, clinic.id, 1)) == 1
        own_primary.server.stop()
        try:
            worker.send("reads 200")
            worker.expect("done")
            worker.send("spilled 200")
            worker.expect("spilled")
        finally:
            worker.kill()
            own_primary.server.start()
    finally:
        if worker.process.poll() is None:
            worker.kill()
    assert worker.reads == 201
    assert len(_spill_files(spill)) == 1
    assert len(logged(own_primary.superuser_url, clinic.id)) == 1

    # A live process's file is its own; a dead one's is written by the next process.
    db = Database(Settings(**settings))
    db.open()
    try:
        rows = wait_logged(own_primary.superuser_url, clinic.id, 201)
    finally:
        db.close()
    assert len(rows) == 201
    assert [row.source for row in rows].count("cache") == 200
    assert {row.actor_id for row in rows} == {clinic.actor_id}
    assert _spill_files(spill) == []


def test_kill_9_loses_at_most_one_flush_interval(
    migrated_db: ServerDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    interval = 1.0  # ACCESS_LOG_FLUSH_INTERVAL's default
    figures = []
    for attempt in range(3):
        clinic = new_clinic(migrated_db.superuser_url, patients=1)
        settings = {
            "database_url": migrated_db.app_url, "redis_url": "", "pool_min": 1,
            "access_log_flush_interval": interval, "health_interval": 60.0,
            # The worst case: only the interval starts a write, however many rows wait.
            "access_log_batch_rows": 10_000_000,
        }
        worker = Worker(settings, clinic.id, clinic.actor_id, clinic.patient_ids[0],
                        tmp_path / f"counter{attempt}")
        try:
            worker.send("loop")
            started = time.monotonic()
            running = threading.Event()
            # Past two flushes, then a random point of the interval.
            while time.monotonic() - started < 2 * interval + 0.2 and worker.process.poll() is None:
                running.wait(0.05)
            running.wait(random.uniform(0, interval))
            killed_at = time.time()
        finally:
            worker.kill()
        reads = worker.reads
        rows = logged(migrated_db.superuser_url, clinic.id)
        assert rows, "nothing was written before the kill"
        lost = reads - len(rows)
        rate = reads / (killed_at - rows[0].recorded_at)
        window = killed_at - rows[-1].recorded_at
        figures.append((reads, lost, rate, window))
        assert lost >= -1  # a read recorded but killed before its count was stored
        assert window <= interval + 0.5, f"{window:.2f} s of reads lost"
        assert lost <= rate * (interval + 0.5)
    with capsys.disabled():
        for reads, lost, rate, window in figures:
            print(f"\nkill -9 at {reads} reads ({rate:.0f}/s): {lost} rows lost, "
                  f"window {window:.3f} s (ACCESS_LOG_FLUSH_INTERVAL={interval} s)")
    assert os.path.exists(tmp_path)


def test_a_process_that_exits_without_close_writes_its_rows(
    migrated_db: ServerDatabase, tmp_path: Path
) -> None:
    clinic = new_clinic(migrated_db.superuser_url, patients=1)
    settings = {"database_url": migrated_db.app_url, "redis_url": "", "pool_min": 1,
                "access_log_flush_interval": 3600, "health_interval": 60.0}
    worker = Worker(settings, clinic.id, clinic.actor_id, clinic.patient_ids[0],
                    tmp_path / "counter")
    try:
        worker.send("reads 100")
        worker.expect("done")
        assert logged(migrated_db.superuser_url, clinic.id) == []  # all still in memory
        stdin = worker.process.stdin
        assert stdin is not None
        stdin.close()  # the worker's loop ends; it returns from main without db.close()
        assert worker.process.wait(60) == 0
    finally:
        if worker.process.poll() is None:
            worker.kill()
    assert len(logged(migrated_db.superuser_url, clinic.id)) == 100
