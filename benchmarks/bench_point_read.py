"""Point read by primary key, single thread (issues 3 and 4).

Variants, all on one server, one pooled connection each, interleaved:
- hcrepo: repository method -> pydantic model, clinic context set, RLS enforced (hcrepo_app);
- raw psycopg: pool checkout in autocommit, same SQL, tuple row, superuser (no RLS, no context);
- hcrepo pipeline, no context: hcrepo's one-round-trip path without the set_config statement;
- SQLAlchemy Core: text() on an AUTOCOMMIT engine over psycopg 3, tuple row;
- aiosql: the same SQL file through aiosql's psycopg adapter on a psycopg_pool.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from pathlib import Path

import aiosql
import psycopg_pool
import sqlalchemy
from pydantic import BaseModel

from benchmarks.harness import interleaved, stack, table
from hcrepo import Database, Repository, Settings, query
from hcrepo import pipeline as hc_pipeline
from hcrepo.pipeline import HcConnection, Statement

SQL_FILE = Path(__file__).parent / "sql" / "point_read.sql"
SQL = (
    "SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, "
    "address FROM patients WHERE id = %s"
)


class Patient(BaseModel):
    id: uuid.UUID
    clinic_id: uuid.UUID
    mrn: str
    first_name: str
    last_name: str
    date_of_birth: datetime.date
    sex: str
    phone: str | None
    email: str | None
    address: str | None


class Patients(Repository, sql=str(SQL_FILE)):
    @query("get_patient", phi=True)
    def get(self, *, id: uuid.UUID) -> Patient | None: ...


def main() -> str:
    with stack() as s:
        ids = itertools.cycle(s.patient_ids[:500])
        db = Database(Settings(database_url=s.app_url, pool_min=1, pool_max=1, redis_url=""))
        raw_pool = psycopg_pool.ConnectionPool(
            s.superuser_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True
        )
        bare_pool = psycopg_pool.ConnectionPool(
            s.superuser_url, min_size=1, max_size=1, connection_class=HcConnection,
            kwargs={"autocommit": True, "prepare_threshold": None}, open=True,
        )
        engine = sqlalchemy.create_engine(
            s.superuser_url.replace("postgresql://", "postgresql+psycopg://"),
            isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0,
        )
        sa_sql = sqlalchemy.text(SQL.replace("%s", ":id"))
        aiosql_queries = aiosql.from_str(
            "-- name: get_patient(id)^\n" + SQL.replace("%s", ":id"), "psycopg"
        )
        plan = Patients.__plans__["get"]

        def raw() -> object:
            with raw_pool.connection() as conn:
                return conn.execute(SQL, (next(ids),)).fetchone()

        def bare() -> object:
            with bare_pool.connection() as conn:
                result = hc_pipeline.run(conn, [Statement(plan.sql, (next(ids),))])[0]
                conn.transformer.set_pgresult(result)
                return conn.transformer.load_rows(0, result.ntuples, tuple)

        def alchemy() -> object:
            with engine.connect() as conn:
                return conn.execute(sa_sql, {"id": next(ids)}).fetchone()

        def with_aiosql() -> object:
            with raw_pool.connection() as conn:
                return aiosql_queries.get_patient(conn, id=next(ids))

        with db, db.context(clinic_id=s.clinic_id, actor_id=s.actor_id):
            repo = Patients(db)
            assert repo.get(id=s.patient_ids[0]) is not None, "RLS context not applied"
            medians = interleaved({
                "raw psycopg (pool, autocommit, tuple, no RLS)": raw,
                "hcrepo (model, clinic context, RLS)": lambda: repo.get(id=next(ids)),
                "hcrepo pipeline without context (no RLS)": bare,
                "SQLAlchemy Core text() AUTOCOMMIT": alchemy,
                "aiosql (psycopg adapter, same pool)": with_aiosql,
            })
        raw_pool.close()
        bare_pool.close()
        engine.dispose()
    baseline = "raw psycopg (pool, autocommit, tuple, no RLS)"
    out = table(medians, baseline, "Point read by primary key (single thread)")
    ctx = medians["hcrepo (model, clinic context, RLS)"]
    out += (
        f"\n\nContext cost: hcrepo with context / hcrepo pipeline without context = "
        f"{ctx / medians['hcrepo pipeline without context (no RLS)']:.2f}"
        f"\nhcrepo / aiosql = {ctx / medians['aiosql (psycopg adapter, same pool)']:.2f}"
        f"\nhcrepo / SQLAlchemy Core = {ctx / medians['SQLAlchemy Core text() AUTOCOMMIT']:.2f}"
    )
    return out


if __name__ == "__main__":
    print(main())
