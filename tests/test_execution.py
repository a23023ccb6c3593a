"""Per-query timeouts in every runner, and dead pooled connections found before sending."""

from __future__ import annotations

import psycopg

from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, Clinical, MakeDatabase, Session


def test_a_query_timeout_applies_to_its_statement_only_in_and_out_of_units_of_work(
    make_db: MakeDatabase,
) -> None:
    db = make_db()
    assert Session(db).probe_with_timeout().statement_timeout == "1234ms"
    assert Session(db).probe().statement_timeout == "0"
    with db.unit_of_work() as uow:
        assert Session(uow).probe_with_timeout().statement_timeout == "1234ms"
        assert Session(uow).probe().statement_timeout == "0"


def _terminate(superuser_url: str, pid: int) -> None:
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


def test_a_plain_write_on_a_dead_pooled_connection_runs_once_on_a_fresh_one(
    make_db: MakeDatabase, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        before = Session(db).probe().pid
        _terminate(migrated_db.superuser_url, before)
        assert Clinical(db).set_phone(id=clinic.patient_ids[0], phone="+1 555 0100") == 1
        after = Session(db).probe().pid
    assert after != before


def test_a_read_on_a_dead_pooled_connection_is_answered(
    make_db: MakeDatabase, clinic: Clinic, migrated_db: ServerDatabase
) -> None:
    db = make_db(pool_min=1, pool_max=1)
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        before = Session(db).probe().pid
        _terminate(migrated_db.superuser_url, before)
        assert len(Clinical(db).patients()) == len(clinic.patient_ids)
