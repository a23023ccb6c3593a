"""The examples, run as their users run them: the queue worker and the batch import as
subprocesses of the same interpreter (this tree first on the path) against the session's
primary, its replica and Redis; and mypy --strict finding hcrepo's types from the install.
"""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis

from examples.compliance import emergency_note, page_privacy_officer
from examples.worker import Job, Worker, register_patient
from hcrepo import Database, Settings
from hcrepo.healthcare import EncounterRepository
from hcrepo.testing import PostgresServer, RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import WaitReplayed
from tests.support.repos import Clinic, new_clinic
from tests.support.routing import Cluster, until
from tests.support.staff import staff_clinic

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0
MESSY_PHONE = "+1 (555) 010-0199"


@pytest.fixture
def fresh_clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, providers=0, patients=0)


@pytest.fixture
def queue(redis_server: RedisServer) -> Iterator[tuple[redis.Redis, str]]:
    client = redis_server.client()
    name = f"examples:{uuid.uuid4().hex[:10]}"
    yield client, name
    client.delete(name, f"{name}:failed")
    client.close()


@pytest.fixture
def lagging(
    routing_schema: None, pg_primary: PostgresServer, pg_replica: PostgresServer,
    wait_replayed: WaitReplayed,
) -> Cluster:
    """Pauses replay on pg_replica (`with lagging.replay_paused(...)`), resumed afterwards."""
    return Cluster(pg_primary, [pg_replica], wait_replayed)


def worker_env(
    migrated_db: ServerDatabase, replica: PostgresServer, redis_url: str, queue: str
) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("HCREPO_", "DB_POOL_", "CACHE_"))}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": migrated_db.app_url,
        "READ_REPLICA_URLS": migrated_db.replica_app_url(replica),
        "REDIS_URL": redis_url,
        "WORKER_QUEUE": queue,
        "DB_POOL_MIN": "1",
        "HCREPO_CACHE_PREFIX": f"ex{uuid.uuid4().hex[:8]}",
        "HCREPO_CACHE_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        # The paused replica must stay routable: only the token may keep reads off it.
        "HCREPO_MAX_LAG_SECONDS": "86400",
        "HCREPO_MAX_LAG_BYTES": str(1 << 40),
        "HCREPO_HEALTH_INTERVAL": "300",
    }


def start_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "worker.py")], env=env, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_until(worker: subprocess.Popen[str], phrase: str, seen: list[str]) -> str:
    """The worker's log lines (kept in `seen`) up to the first holding `phrase`."""
    assert worker.stderr is not None
    for line in worker.stderr:
        seen.append(line)
        if phrase in line:
            return line
    raise AssertionError(f"the worker ended before printing {phrase!r}: {''.join(seen)}")


def register(db: Database, client: redis.Redis, clinic: Clinic, queue: str, tag: str) -> Job:
    return register_patient(
        db, client, clinic_id=clinic.id, actor_id=clinic.actor_id, mrn=f"w-{tag}",
        first_name="Queued", last_name="Patient", date_of_birth=date(1985, 5, 5), sex="unknown",
        phone=MESSY_PHONE, queue=queue,
    )


def phone_of(url: str, patient_id: UUID) -> str | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT phone FROM patients WHERE id = %s", [patient_id]).fetchone()
    return None if row is None else str(row[0])


def primary_only(migrated_db: ServerDatabase) -> Database:
    return Database(Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1,
                             pool_max=2))


def test_the_worker_reads_the_producers_write_through_the_token_while_the_replica_lags(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, redis_server: RedisServer,
    queue: tuple[redis.Redis, str], lagging: Cluster, fresh_clinic: Clinic,
) -> None:
    client, name = queue
    replica_url = migrated_db.replica_superuser_url(pg_replica)
    with lagging.replay_paused(pg_replica), primary_only(migrated_db) as producer:
        job = register(producer, client, fresh_clinic, name, uuid.uuid4().hex[:10])
        assert job.token is not None
        worker = start_worker(worker_env(migrated_db, pg_replica, redis_server.url, name))
        seen: list[str] = []
        try:
            done = read_until(worker, "job done", seen)
            assert f"patient {job.patient_id} normalised" in done
            assert phone_of(migrated_db.superuser_url, job.patient_id) == "+15550100199"
            # Still paused: the replica has neither the patient nor the worker's write.
            with psycopg.connect(replica_url, autocommit=True) as conn:
                assert conn.execute("SELECT count(*) FROM patients WHERE id = %s",
                                    [job.patient_id]).fetchone() == (0,)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(WAIT) == 0, "".join(seen)
    assert client.llen(f"{name}:failed") == 0


def test_without_the_token_the_same_job_reads_the_lagging_replica(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, redis_server: RedisServer,
    queue: tuple[redis.Redis, str], lagging: Cluster, fresh_clinic: Clinic,
) -> None:
    client, name = queue
    env = worker_env(migrated_db, pg_replica, redis_server.url, name)
    settings = Settings(database_url=env["DATABASE_URL"],
                        read_replica_urls=[env["READ_REPLICA_URLS"]], redis_url="",
                        max_lag_seconds=86400, max_lag_bytes=1 << 40, health_interval=300)
    with Database(settings) as db, lagging.replay_paused(pg_replica), \
            primary_only(migrated_db) as producer:
        job = register(producer, client, fresh_clinic, name, uuid.uuid4().hex[:10])
        untokened = Job(job.clinic_id, job.actor_id, job.patient_id, token=None)
        assert Worker(db, client, name).handle(untokened) == "missing"
        assert Worker(db, client, name).handle(job) == "normalised"


def test_sigterm_finishes_the_job_in_hand_then_stops(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, redis_server: RedisServer,
    queue: tuple[redis.Redis, str], fresh_clinic: Clinic,
) -> None:
    client, name = queue
    with primary_only(migrated_db) as producer:
        first, second = (register(producer, client, fresh_clinic, name, uuid.uuid4().hex[:10])
                         for _ in range(2))
    seen: list[str] = []
    with psycopg.connect(migrated_db.superuser_url) as locker, \
            psycopg.connect(migrated_db.superuser_url, autocommit=True) as watcher:
        # The worker's write of the first job waits behind this row lock: the job is in hand.
        locker.execute("SELECT 1 FROM patients WHERE id = %s FOR UPDATE", [first.patient_id])
        worker = start_worker(worker_env(migrated_db, pg_replica, redis_server.url, name))
        try:
            until(lambda: lock_waiters(watcher, migrated_db.dbname) == 1,
                  "the worker to wait for the row lock", timeout=WAIT)
            worker.send_signal(signal.SIGTERM)
            read_until(worker, "stopping after the job in hand", seen)
            locker.rollback()
            assert worker.wait(WAIT) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
    assert worker.stderr is not None
    seen.extend(worker.stderr)
    log = "".join(seen)
    assert f"job done: patient {first.patient_id} normalised" in log
    assert "worker stopped after 1 jobs" in log
    assert phone_of(migrated_db.superuser_url, first.patient_id) == "+15550100199"
    assert [Job.loads(raw) for raw in client.lrange(name, 0, -1)] == [second]
    assert phone_of(migrated_db.superuser_url, second.patient_id) == MESSY_PHONE


def lock_waiters(conn: psycopg.Connection[Any], dbname: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = 'hcrepo_app'"
        " AND wait_event_type = 'Lock'", [dbname],
    ).fetchone()
    return int(row[0]) if row else 0


# --- batch import ------------------------------------------------------------------------

HEADER = ["mrn", "first_name", "last_name", "date_of_birth", "sex", "phone"]


def batch_rows(tag: str) -> list[list[str]]:
    """Lines 2 to 9 of the file: the good rows are at lines 2, 4, 7 and 8."""
    return [
        [f"{tag}-a", "Quillonia", "Farthingale", "1970-03-04", "female", "555-0101"],
        [f"{tag}-b", "Brannoch", "Wystan", "1990-13-45", "male", ""],            # bad date
        [f"{tag}-c", "Idrelle", "Pomfrey", "2001-11-30", "other", ""],
        [f"{tag}-d", "Castellan", "", "1966-07-08", "unknown", ""],              # no last name
        [f"{tag}-a", "Dupleigh", "Twiceover", "1980-01-02", "male", "555-0102"],  # MRN of line 2
        [f"{tag}-e", "Orlaithe", "Bexley", "1955-09-10", "female", ""],
        [f"{tag}-f", "Tamsin", "Ravelstone", "1999-12-31", "unknown", ""],
        [f"{tag}-f", "Gwythyr", "Sameno", "1999-12-30", "male", ""],             # MRN of line 8
    ]


def run_import(migrated_db: ServerDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": migrated_db.app_url,
           "READ_REPLICA_URLS": "", "REDIS_URL": "", "DB_POOL_MIN": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "batch_import.py"), *args], env=env,
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
    )


def test_batch_import_keeps_the_good_rows_and_reports_each_bad_one_by_line(
    migrated_db: ServerDatabase, fresh_clinic: Clinic, tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    rows = batch_rows(tag)
    path = tmp_path / "patients.csv"
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([HEADER, *rows])
    done = run_import(migrated_db, str(path), "--clinic", str(fresh_clinic.id),
                      "--actor", str(fresh_clinic.actor_id), "--batch-size", "2")
    assert done.returncode == 1, done.stderr
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        stored = conn.execute("SELECT mrn, first_name FROM patients WHERE clinic_id = %s"
                              " ORDER BY mrn", [fresh_clinic.id]).fetchall()
    assert stored == [(rows[n][0], rows[n][1]) for n in (0, 2, 5, 6)]
    report = {line.split(":", 1)[0]: line for line in done.stdout.splitlines()[1:]}
    assert sorted(report) == ["line 3", "line 5", "line 6", "line 9"]
    assert "date_of_birth" in report["line 3"]
    assert "last_name: missing" in report["line 5"]
    assert "MRN" in report["line 6"] and "MRN" in report["line 9"]
    assert done.stdout.splitlines()[0] == "imported 4 patients, rejected 4 rows"
    output = done.stdout + done.stderr
    leaked = [cell for row in rows for cell in row[:4] + row[5:] if cell and cell in output]
    assert leaked == []


def test_batch_import_refuses_a_file_that_is_not_a_patient_csv(
    migrated_db: ServerDatabase, fresh_clinic: Clinic, tmp_path: Path,
) -> None:
    path = tmp_path / "people.csv"
    path.write_text("mrn,given_name\nzz-1,Nobody\n")
    done = run_import(migrated_db, str(path), "--clinic", str(fresh_clinic.id),
                      "--actor", str(fresh_clinic.actor_id))
    assert done.returncode == 2
    assert "given_name" in done.stderr and "Nobody" not in done.stderr
    assert run_import(migrated_db, str(path), "--clinic", "not-a-uuid",
                      "--actor", str(fresh_clinic.actor_id)).returncode == 2


# --- the editable install ----------------------------------------------------------------


def editable_install() -> bool:
    """hcrepo installed editable in this interpreter's site-packages (not merely importable:
    a source tree on the path may hold egg-info of its own)."""
    site_packages = [sysconfig.get_path("purelib")]
    for dist in importlib.metadata.distributions(name="hcrepo", path=site_packages):
        direct_url = dist.read_text("direct_url.json")
        return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))
    return False


@pytest.mark.skipif(not editable_install(),
                    reason="hcrepo is not installed editable in this venv (`make` does that)")
def test_a_break_glass_read_is_alerted_and_shows_in_the_patients_trail(
    migrated_db: ServerDatabase,
) -> None:
    staff = staff_clinic(migrated_db.superuser_url)
    nurse = staff.members["nurse"]
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=2)
    with Database(settings, on_emergency_access=page_privacy_officer) as db:
        with db.context(clinic_id=staff.id, actor_id=nurse):  # another clinician's draft
            assert EncounterRepository(db).get(id=staff.draft_encounter_id) is None
        assert emergency_note(db, clinic_id=staff.id, clinician_id=nurse,
                              encounter_id=staff.draft_encounter_id, reason="collapsed")
    # After close: the access log written, the audit rows sealed.
    done = subprocess.run(
        [sys.executable, "-m", "examples.compliance", "trail", str(staff.patient_id)],
        env={**os.environ, "HCREPO_AUDITOR_URL": migrated_db.auditor_url}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    viewed = [line for line in done.stdout.splitlines() if " viewed get_encounter " in line]
    assert len(viewed) == 1 and f"by {nurse} (membership role)" in viewed[0]
    assert viewed[0].endswith(" BREAK-GLASS") and "collapsed" not in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "examples.compliance", "trail", str(staff.patient_id)],
        env={k: v for k, v in os.environ.items() if k != "HCREPO_AUDITOR_URL"}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert missing.returncode == 2 and "HCREPO_AUDITOR_URL" in missing.stderr


def test_mypy_strict_finds_hcrepo_types_from_the_editable_install(tmp_path: Path) -> None:
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.skip(f"no mypy beside {sys.executable}")
    (tmp_path / "app.py").write_text(
        "from hcrepo import Database\n\n"
        "db: int = Database.from_env()\n"
    )
    # Only the install may lead mypy to hcrepo: no PYTHONPATH, no MYPYPATH, no config.
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "MYPYPATH")}
    checked = subprocess.run(
        [str(mypy), "--strict", "--no-incremental", "app.py"], cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
    )
    assert "import-not-found" not in checked.stdout, (
        "mypy cannot follow hcrepo's editable install: install it with "
        "--config-settings editable_mode=compat (see the Makefile) and rerun make"
    )
    assert 'expression has type "Database", variable has type "int"' in checked.stdout
    assert checked.returncode == 1
