"""Invariant 2 through PgBouncer in transaction mode: one server session, many clinics.

PgBouncer 1.18 (Debian 12) keeps no prepared statements per client, so hcrepo runs behind it
with HCREPO_PREPARED_STATEMENTS=false: statements are parsed unnamed inside their batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from hcrepo import Database, Settings
from hcrepo.testing import PgBouncer, PostgresServer
from tests.plugins.database import APP_PASSWORD
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, new_clinic

ROUNDS = 25
WAIT = 20.0


@pytest.fixture(scope="module")
def bouncer(pg_primary: PostgresServer, migrated_db: ServerDatabase) -> Iterator[PgBouncer]:
    with PgBouncer(pg_primary, dbname=migrated_db.dbname, users={"hcrepo_app": APP_PASSWORD},
                   pool_size=1) as pgbouncer:
        yield pgbouncer


@pytest.fixture
def two_clinics(migrated_db: ServerDatabase) -> tuple[Clinic, Clinic]:
    return (new_clinic(migrated_db.superuser_url, patients=2),
            new_clinic(migrated_db.superuser_url, patients=3))


def _database(bouncer: PgBouncer, **overrides: object) -> Database:
    settings = Settings(database_url=bouncer.url(user="hcrepo_app"), redis_url="",
                        pool_min=2, pool_max=4, prepared_statements=False, **overrides)
    return Database(settings)


def test_clinics_sharing_one_server_session_never_see_each_other(
    bouncer: PgBouncer, two_clinics: tuple[Clinic, Clinic]
) -> None:
    start = threading.Barrier(4)
    seen: list[tuple[Clinic, set[object]]] = []
    failures: list[BaseException] = []

    def work(clinic: Clinic, db: Database) -> None:
        try:
            start.wait(WAIT)
            for n in range(ROUNDS):
                with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
                    if n % 5 == 0:
                        with db.unit_of_work() as uow:
                            Clinical(uow).set_phone(id=clinic.patient_ids[0], phone=f"+1 {n}")
                            seen.append((clinic, {r.clinic_id for r in Clinical(uow).patients()}))
                    seen.append((clinic, {r.clinic_id for r in Clinical(db).patients()}))
                    seen.append((clinic, {r.clinic_id for r in Clinical(db).stream_patients()}))
        except BaseException as exc:
            failures.append(exc)

    with _database(bouncer) as db:
        threads = [threading.Thread(target=work, args=(clinic, db))
                   for clinic in (*two_clinics, *two_clinics)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 3)
    assert failures == []
    assert len(seen) == 4 * ROUNDS * 2 + 4 * (ROUNDS // 5)
    for clinic, clinics in seen:
        assert clinics == {clinic.id}


def test_the_server_session_keeps_no_clinic_after_a_transaction(
    bouncer: PgBouncer, two_clinics: tuple[Clinic, Clinic]
) -> None:
    clinic, _ = two_clinics
    db = _database(bouncer)
    with db, db.unit_of_work(clinic_id=clinic.id, actor_id=clinic.actor_id) as uow:
        assert len(Clinical(uow).patients()) == len(clinic.patient_ids)
    # pool_size=1: this plain client gets the very server session the unit of work used.
    with psycopg.connect(bouncer.url(user="hcrepo_app"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(current_setting('app.clinic_id', true), ''),"
            " (SELECT count(*) FROM patients)"
        ).fetchone()
    assert row == ("", 0)
