"""Point read by primary key, single thread.

All variants read the same rows from one server, each over its own pool, interleaved:
- raw psycopg: pool checkout in autocommit, same SQL, tuple row, superuser (no RLS);
- aiosql: the same SQL through aiosql's psycopg adapter on that pool;
- SQLAlchemy Core: text() on an AUTOCOMMIT engine over psycopg 3, tuple row;
- hcrepo: repository method -> pydantic model, clinic context, hcrepo_app under RLS;
- hcrepo, no context: the same method on a clinic-independent repository as the superuser,
  no clinic in context (hcrepo still sends its empty set_config: it always does);
- hcrepo, clinic context, RLS bypassed: the tenant repository with the clinic context, as the
  superuser (which RLS does not apply to): the context's cost to the client and the wire,
  without the policy's cost on the server;
- hcrepo pipeline, bare: hcrepo's round trip with no set_config statement at all, superuser:
  the floor of hcrepo's own machinery.
"""

from __future__ import annotations

import contextvars
import datetime
import itertools
import uuid
from pathlib import Path
from typing import Any

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


class UnscopedPatients(Repository, sql=str(SQL_FILE), tenant=False):
    # Not phi=True: a PHI call is logged with its clinic, and this one has none.
    @query("get_patient")
    def get(self, *, id: uuid.UUID) -> Patient | None: ...


# Every variant rotates over this many connections (the pools hand them out first in, first
# out): one backend can be steadily faster than another, and that must not pick a winner.
CONNECTIONS = 4
RAW = "raw psycopg (pool, autocommit, tuple, no RLS)"
AIOSQL = "aiosql (psycopg adapter, same pool)"
ALCHEMY = "SQLAlchemy Core text() AUTOCOMMIT"
HCREPO = "hcrepo (model, clinic context, RLS)"
NO_CONTEXT = "hcrepo, no context (model, no RLS)"
BYPASSED = "hcrepo, clinic context, RLS bypassed (superuser)"
BARE = "hcrepo pipeline, bare (no set_config, no RLS)"


def main() -> str:
    with stack() as s:
        ids = itertools.cycle(s.patient_ids[:500])
        sized: dict[str, Any] = {"pool_min": CONNECTIONS, "pool_max": CONNECTIONS, "redis_url": ""}
        db = Database(Settings(database_url=s.app_url, **sized))
        # The superuser on purpose: the no-RLS baselines (refused by default, so allowed here).
        unscoped_db = Database(Settings(database_url=s.superuser_url, allow_privileged_role=True,
                                        **sized))
        pools: dict[str, Any] = {"min_size": CONNECTIONS, "max_size": CONNECTIONS, "open": True}
        raw_pool = psycopg_pool.ConnectionPool(
            s.superuser_url, kwargs={"autocommit": True}, **pools
        )
        bare_pool = psycopg_pool.ConnectionPool(
            s.superuser_url, connection_class=HcConnection,
            kwargs={"autocommit": True, "prepare_threshold": None}, **pools,
        )
        engine = sqlalchemy.create_engine(
            s.superuser_url.replace("postgresql://", "postgresql+psycopg://"),
            isolation_level="AUTOCOMMIT", pool_size=CONNECTIONS, max_overflow=0,
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

        with db, unscoped_db:
            unscoped = UnscopedPatients(unscoped_db)
            bypassing = Patients(unscoped_db)
            repo = Patients(db)
            nobody = contextvars.Context()  # no clinic, no actor: what a bare worker has

            def unscoped_read() -> object:
                return nobody.run(unscoped.get, id=next(ids))

            with db.context(clinic_id=s.clinic_id, actor_id=s.actor_id):
                assert repo.get(id=s.patient_ids[0]) is not None, "RLS context not applied"
                medians = interleaved({
                    RAW: raw, AIOSQL: with_aiosql, ALCHEMY: alchemy,
                    HCREPO: lambda: repo.get(id=next(ids)), NO_CONTEXT: unscoped_read,
                    BYPASSED: lambda: bypassing.get(id=next(ids)), BARE: bare,
                }, rounds=150)
        raw_pool.close()
        bare_pool.close()
        engine.dispose()
    out = table(medians, RAW, "Point read by primary key (single thread)")
    ratios = [
        ("hcrepo / raw psycopg without RLS (target <= 1.25)",
         HCREPO, RAW),
        ("hcrepo / aiosql (target <= 1.15)", HCREPO, AIOSQL),
        ("hcrepo / SQLAlchemy Core (target < 1)", HCREPO, ALCHEMY),
        ("hcrepo with clinic context / the same read with no context (target <= 1.10)",
         HCREPO, NO_CONTEXT),
        ("hcrepo with clinic context, RLS bypassed / no context (the context's client cost)",
         BYPASSED, NO_CONTEXT),
        ("hcrepo with clinic context / RLS bypassed (the policy's server cost)",
         HCREPO, BYPASSED),
        ("hcrepo no context / bare pipeline (cost of always sending set_config)",
         NO_CONTEXT, BARE),
    ]
    out += "\n\n| ratio | value |\n|---|---:|\n" + "\n".join(
        f"| {label} | {medians[a] / medians[b]:.2f} |" for label, a, b in ratios
    )
    return out


if __name__ == "__main__":
    print(main())
