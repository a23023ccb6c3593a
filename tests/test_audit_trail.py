"""The auditor role and one patient's trail: views and changes merged in time order, the
auditor reading every clinic's audit rows and no clinical table, its use logged; the
`hcrepo audit` commands' inputs and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

import hcrepo
from hcrepo import Database, Settings
from hcrepo.healthcare import PatientRepository
from tests.plugins.database import Database as ServerDatabase
from tests.support.audit import superuser
from tests.support.cli import assert_one_line
from tests.support.cli import hcrepo as run
from tests.support.repos import Clinic, new_clinic

KEY = "a digest key of at least 16 bytes"


@pytest.fixture(scope="module")
def db(migrated_db: ServerDatabase) -> Iterator[Database]:
    settings = Settings(database_url=migrated_db.app_url, redis_url="", pool_min=1, pool_max=2,
                        audit_sealer=False)
    with Database(settings) as database:
        yield database


def _view(url: str, clinic: Clinic, at: datetime, query: str, source: str) -> None:
    """A view in the access log, written as the owner (the recorder's side is not tested
    here)."""
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO audit.access_log (recorded_at, actor_id, clinic_id, staff_role, "
                     "query, patient_ids, source) VALUES (%s, %s, %s, 'doctor', %s, %s, %s)",
                     [at, clinic.actor_id, clinic.id, query, [clinic.patient_ids[0]], source])


def _at(url: str, clinic: Clinic) -> datetime:
    """When the patient's last change was written."""
    [(at,)] = superuser(url, "SELECT max(at) FROM audit.changes WHERE patient_id = %s",
                        [clinic.patient_ids[0]])
    return at  # type: ignore[no-any-return]


def test_the_trail_merges_views_and_changes_in_time_order(
    db: Database, migrated_db: ServerDatabase
) -> None:
    clinic = new_clinic(migrated_db.superuser_url, patients=1)
    patient = clinic.patient_ids[0]
    created = _at(migrated_db.superuser_url, clinic)
    _view(migrated_db.owner_url, clinic, created + timedelta(microseconds=1),
          "PatientRepository.get", "replica:r1")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        PatientRepository(db).rename(id=patient, first_name="Ann", last_name="Lee")
    renamed = _at(migrated_db.superuser_url, clinic)
    _view(migrated_db.owner_url, clinic, renamed + timedelta(microseconds=1),
          "PatientRepository.search", "cache")
    _view(migrated_db.owner_url, clinic, created - timedelta(days=1), "PatientRepository.get",
          "primary")

    trail = hcrepo.patient_trail(migrated_db.auditor_url, patient)
    assert [(e.kind, e.what, e.source) for e in trail] == [
        ("viewed", "PatientRepository.get", "primary"),
        ("changed", "insert patients", None),
        ("viewed", "PatientRepository.get", "replica:r1"),
        ("changed", "update patients", None),
        ("viewed", "PatientRepository.search", "cache"),
    ]
    assert trail[3].actor_id == clinic.actor_id and trail[3].columns == (
        "first_name", "last_name", "updated_at")
    assert trail[1].actor_id is None  # the superuser's insert of the test setup
    assert [e.at for e in trail] == sorted(e.at for e in trail)

    since = hcrepo.patient_trail(migrated_db.auditor_url, patient, renamed)
    assert [e.kind for e in since] == ["changed", "viewed"]
    by_day = hcrepo.patient_trail(migrated_db.auditor_url, str(patient),
                                  (created + timedelta(days=1)).date())
    assert by_day == []

    logged = superuser(migrated_db.superuser_url,
                       "SELECT db_role, command, args ->> 'patient_id' FROM audit.auditor_log "
                       "WHERE args ->> 'patient_id' = %s", [str(patient)])
    assert logged == [("hcrepo_auditor", "trail", str(patient))] * 3

    printed = run("audit", "trail", "--patient", str(patient), "--since",
                  created.date().isoformat(), env={"HCREPO_AUDITOR_URL": migrated_db.auditor_url})
    assert (printed.returncode, printed.stderr) == (0, "")
    lines = printed.stdout.splitlines()
    assert len(lines) == 4
    assert "changed" in lines[2] and f"actor={clinic.actor_id}" in lines[2]
    assert "[first_name, last_name, updated_at]" in lines[2]
    assert lines[1].endswith("via replica:r1")
    assert "Ann" not in printed.stdout and "Lee" not in printed.stdout  # no values


def test_the_auditor_reads_every_clinic_and_no_clinical_table(
    db: Database, migrated_db: ServerDatabase
) -> None:
    a = new_clinic(migrated_db.superuser_url, patients=1)
    b = new_clinic(migrated_db.superuser_url, patients=1)
    with psycopg.connect(migrated_db.auditor_url) as conn:
        [(clinics,)] = conn.execute("SELECT count(DISTINCT clinic_id) FROM audit.changes "
                                    "WHERE clinic_id IN (%s, %s)", [a.id, b.id]).fetchall()
        assert clinics == 2
        conn.execute("SELECT count(*) FROM audit.chain, audit.access_log, audit.purges")
        conn.rollback()
        for statement in ("SELECT count(*) FROM patients", "SELECT count(*) FROM encounters",
                          "SELECT count(*) FROM users",
                          "INSERT INTO audit.auditor_log (command) VALUES ('forged')",
                          "UPDATE audit.changes SET actor_id = NULL",
                          "SELECT audit.seal(1)"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()


def test_the_audit_commands_refuse_bad_input_in_one_line(
    migrated_db: ServerDatabase, tmp_path: Path
) -> None:
    auditor = {"HCREPO_AUDITOR_URL": migrated_db.auditor_url}
    no_key = run("audit", "digest", env=auditor)
    assert no_key.returncode == 2
    assert_one_line(no_key.stderr,
                    starts="hcrepo: HCREPO_AUDIT_DIGEST_KEY: is required but not set")
    short = run("audit", "digest", env={**auditor, "HCREPO_AUDIT_DIGEST_KEY": "short"})
    assert short.returncode == 2
    assert_one_line(short.stderr, starts="hcrepo: HCREPO_AUDIT_DIGEST_KEY: must be at least")
    no_url = run("audit", "trail", "--patient", "6f1c7d9e-8c1a-4d5e-9f00-000000000001")
    assert no_url.returncode == 2
    assert_one_line(no_url.stderr, starts="hcrepo: HCREPO_AUDITOR_URL: is required but not set")
    for args in (("audit", "trail", "--patient", "not-a-uuid"),
                 ("audit", "trail", "--patient", "6f1c7d9e-8c1a-4d5e-9f00-000000000001",
                  "--since", "yesterday"),
                 ("audit", "verify", "--clinic", "7")):
        bad = run(*args, env=auditor)
        assert bad.returncode == 2, args
        assert_one_line(bad.stderr, starts=f"hcrepo audit {args[1]}: argument ")
    missing = run("audit", "verify", "--digest", str(tmp_path / "none.json"),
                  env={**auditor, "HCREPO_AUDIT_DIGEST_KEY": KEY})
    assert missing.returncode == 2
    assert_one_line(missing.stderr, starts="hcrepo: --digest: cannot read")


def test_digest_then_verify_and_a_tampered_digest_fails(
    migrated_db: ServerDatabase, tmp_path: Path
) -> None:
    env = {"HCREPO_AUDITOR_URL": migrated_db.auditor_url, "HCREPO_AUDIT_DIGEST_KEY": KEY}
    assert run("audit", "seal", "--database", migrated_db.app_url).returncode == 0
    printed = run("audit", "digest", env=env)
    assert printed.returncode == 0, printed.stderr
    signed = json.loads(printed.stdout)
    assert set(signed) == {"version", "time", "heads", "hmac"}
    path = tmp_path / "digest.json"
    path.write_text(printed.stdout)
    ok = run("audit", "verify", "--digest", str(path), env=env)
    assert ok.returncode == 0, ok.stdout
    signed["time"] = datetime(2000, 1, 1, tzinfo=UTC).isoformat()
    path.write_text(json.dumps(signed))
    forged = run("audit", "verify", "--digest", str(path), env=env)
    assert forged.returncode == 1
    assert_one_line(forged.stderr, starts="hcrepo: the digest's HMAC does not match")
