"""The write-audit trail's cost: with audit against without, interleaved.

"Without" is a second database on the same server, migrated the same way, with the audit
triggers disabled; the audited one runs the in-process sealer (AUDIT_SEAL_INTERVAL 200 ms),
as production does. Three workloads: a single-row update through a unit of work; 8 threads
updating different patients of one clinic (a chain built inside the writers' transactions
would serialize them: this is the figure that would show it); a 200,000-row INSERT ... SELECT
into patients in a unit of work. Then the sealer's delay, from a change's statement to its
link, over the changes of the first two workloads.
"""

from __future__ import annotations

import itertools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from benchmarks.harness import Stack, database, interleaved, stack, table
from hcrepo import Database, Repository, Settings, query

THREADS = 8
UPDATES_PER_THREAD = 10
BULK_ROWS = 200_000
_TRIGGERS = ("audit_insert", "audit_update", "audit_delete", "audit_truncate")
_PHI = ("patients", "appointments", "encounters", "prescriptions")


class Writes(Repository, sql="sql/audit.sql"):
    @query("touch_patient", phi=True)
    def touch(self, *, id: uuid.UUID, phone: str) -> int: ...

    @query("bulk_patients", phi=True)
    def bulk(self, *, prefix: str, count: int) -> int: ...


def _without_audit(s: Stack) -> None:
    with psycopg.connect(s.superuser_url, autocommit=True) as conn:
        for table_name, trigger in itertools.product(_PHI, _TRIGGERS):
            conn.execute(f"ALTER TABLE {table_name} DISABLE TRIGGER {trigger}")


def _delays(s: Stack, after: int) -> tuple[float, float, int]:
    with psycopg.connect(s.superuser_url) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY d), count(*) FROM ("
            " SELECT extract(epoch FROM k.sealed_at - c.at) * 1000 AS d"
            " FROM audit.changes c JOIN audit.chain k ON k.change_id = c.id"
            " WHERE c.id > %s AND c.action = 'UPDATE') AS t", [after]).fetchone()
    assert row is not None
    return float(row[0]), float(row[1]), int(row[2])


def _sealed(s: Stack, timeout: float = 30.0) -> None:
    """Wait (bounded) until the sealer has linked every change, so that the delays below
    include the slowest."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(s.superuser_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM audit.changes c WHERE NOT EXISTS "
                               "(SELECT FROM audit.chain k WHERE k.change_id = c.id)").fetchone()
            if row is None or row[0] == 0:
                return
            time.sleep(0.05)


def _last_change(s: Stack) -> int:
    with psycopg.connect(s.superuser_url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM audit.changes").fetchone()
    return int(row[0]) if row else 0


def main() -> str:
    with stack(patients=2000) as audited:
        plain = database(audited.server, "hcrepo_bench_plain", 2000)
        _without_audit(plain)
        settings: dict[str, Any] = {"redis_url": "", "pool_min": THREADS, "pool_max": THREADS}
        dbs = {
            "with audit": Database(Settings(database_url=audited.app_url, **settings)),
            "without audit": Database(Settings(database_url=plain.app_url, audit_sealer=False,
                                               **settings)),
        }
        stacks = {"with audit": audited, "without audit": plain}
        pool = ThreadPoolExecutor(THREADS)
        counter = itertools.count()
        try:
            for db in dbs.values():
                db.open()
            mark = _last_change(audited)

            def single(name: str) -> Any:
                db, s = dbs[name], stacks[name]
                ids = itertools.cycle(s.patient_ids[:500])

                def run() -> object:
                    with db.context(clinic_id=s.clinic_id, actor_id=s.actor_id), \
                            db.unit_of_work() as uow:
                        return Writes(uow).touch(id=next(ids), phone=str(next(counter)))
                return run

            def threads(name: str) -> Any:
                db, s = dbs[name], stacks[name]

                def one(patient: uuid.UUID) -> None:
                    with db.context(clinic_id=s.clinic_id, actor_id=s.actor_id):
                        for _ in range(UPDATES_PER_THREAD):
                            with db.unit_of_work() as uow:
                                Writes(uow).touch(id=patient, phone=str(next(counter)))

                def run() -> object:
                    return list(pool.map(one, s.patient_ids[1000:1000 + THREADS]))
                return run

            def bulk(name: str) -> Any:
                db, s = dbs[name], stacks[name]

                def run() -> object:
                    with db.context(clinic_id=s.clinic_id, actor_id=s.actor_id), \
                            db.unit_of_work() as uow:
                        return Writes(uow).bulk(prefix=f"b{next(counter)}-", count=BULK_ROWS)
                return run

            single_medians = interleaved({n: single(n) for n in dbs}, rounds=20,
                                         calls_per_slice=40, warmup=100)
            thread_medians = interleaved({n: threads(n) for n in dbs}, rounds=10,
                                         calls_per_slice=3, warmup=2)
            _sealed(audited)
            p50, p99, sealed = _delays(audited, mark)
            # Seconds per call: two rounds (one Williams design) keep the run near two minutes.
            bulk_medians = interleaved({n: bulk(n) for n in dbs}, rounds=2, calls_per_slice=1,
                                       warmup=0)
        finally:
            pool.shutdown()
            for db in dbs.values():
                db.close()
    throughput = thread_medians["without audit"] / thread_medians["with audit"]
    return "\n\n".join([
        table(single_medians, "without audit",
              "Single-row update through a unit of work"),
        table(thread_medians, "without audit",
              f"{THREADS} threads x {UPDATES_PER_THREAD} single-row units, one clinic "
              f"(µs per burst; throughput with audit = {throughput:.2f}x of without)"),
        table(bulk_medians, "without audit",
              f"{BULK_ROWS:,}-row INSERT ... SELECT into patients in a unit of work"),
        f"Sealer delay, change statement to chain link, {sealed} updates, AUDIT_SEAL_INTERVAL "
        f"200 ms: p50 {p50:.0f} ms, p99 {p99:.0f} ms",
    ])


if __name__ == "__main__":
    print(main())
