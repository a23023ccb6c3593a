"""The PHI access log's cost on a PHI read, single thread, medians of interleaved slices.

- a point read by primary key served by a streaming replica, ACCESS_LOG on vs off;
- the same read served by the Redis cache (AES-GCM, as PHI is cached), on vs off.

The "log on" databases' writer threads run as in production (ACCESS_LOG_FLUSH_INTERVAL=1s,
binary COPY to the primary) while every variant runs, so their CPU is spread over all
slices. The "on, written in the slice" variants (writer interval 1 h) end each slice with a
synchronous write of the rows the slice recorded, so that the slice pays for all of it,
COPY round trips and the COMMIT's WAL flush on the server included: an upper bound, with
2000-row batches (a second of reads at 2000 reads/s).

Target: on / off <= 1.10 for both reads.
"""

from __future__ import annotations

import base64
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.bench_point_read import Patient
from benchmarks.harness import APP_PASSWORD, DBNAME, interleaved, pin, stack, table
from hcrepo import Database, Repository, Settings, cached, query
from hcrepo.admin import migrate
from hcrepo.ops import metrics
from hcrepo.testing import RedisServer, wait_for_replay

SQL_FILE = str(Path(__file__).parent / "sql" / "point_read.sql")
SLICE = 2000


class PhiPatients(Repository, sql=SQL_FILE):
    @query("get_patient", phi=True)
    def get(self, *, id: uuid.UUID) -> Patient | None: ...


class CachedPhiPatients(Repository, sql=SQL_FILE):
    @query("get_patient", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"])
    def get(self, *, id: uuid.UUID) -> Patient | None: ...


def main() -> str:
    with stack() as s, RedisServer() as redis_server:
        replica = s.server.create_replica()
        wait_for_replay(replica, s.server.current_wal_lsn())
        pin(replica)
        replica_url = replica.url(user=migrate.APP_ROLE, password=APP_PASSWORD, dbname=DBNAME)
        key = base64.b64encode(os.urandom(32)).decode()

        def database(log: bool, cache: bool, interval: float = 1.0) -> Database:
            return Database(Settings(
                database_url=s.app_url, read_replica_urls=[] if cache else [replica_url],
                redis_url=redis_server.url if cache else "", cache_encryption_key=key,
                cache_key_prefix=f"b{uuid.uuid4().hex[:8]}", pool_min=1, pool_max=2,
                access_log=log, access_log_flush_interval=interval,
                access_log_batch_rows=1_000_000,
            ))

        dbs = {
            "replica read, log off": database(False, False),
            "replica read, log on": database(True, False),
            "replica read, log on, written in the slice": database(True, False, 3600),
            "cache hit, log off": database(False, True),
            "cache hit, log on": database(True, True),
            "cache hit, log on, written in the slice": database(True, True, 3600),
        }
        ids = s.patient_ids[:200]
        written = metrics.ACCESS_LOG_ROWS.labels(outcome="written")
        before = written._value.get()
        for db in dbs.values():
            db.open()
        try:
            variants: dict[str, Callable[[], object]] = {}
            with dbs["replica read, log off"].context(clinic_id=s.clinic_id,
                                                      actor_id=s.actor_id):
                for name, db in dbs.items():
                    repo = (CachedPhiPatients if name.startswith("cache") else PhiPatients)(db)
                    for patient_id in ids:  # warm: every id cached
                        assert repo.get(id=patient_id) is not None
                    cycle = itertools.cycle(ids)
                    if name.endswith("in the slice"):
                        variants[name] = _paying(repo, cycle, db)
                    else:
                        variants[name] = _reading(repo, cycle)
                medians = interleaved(variants, rounds=12, calls_per_slice=SLICE, warmup=500)
        finally:
            for db in dbs.values():
                db.close()
        rows = written._value.get() - before

    out = table({name: value for name, value in medians.items() if name.startswith("replica")},
                "replica read, log off", "Access log: PHI point read served by a replica")
    out += "\n\n" + table(
        {name: value for name, value in medians.items() if name.startswith("cache")},
        "cache hit, log off", "Access log: PHI point read served by the cache")
    checks = [
        (f"{kind}: log on / off <= 1.10", medians[f"{kind}, log on"] / medians[f"{kind}, log off"])
        for kind in ("replica read", "cache hit")
    ]
    out += "\n\n| target | measured | met |\n|---|---:|:---:|\n" + "\n".join(
        f"| {name} | {value:.3f} | {'yes' if value <= 1.10 else 'NO'} |"
        for name, value in checks
    )
    return out + f"\n\n{rows} access log rows written during the run."


def _reading(
    repo: PhiPatients | CachedPhiPatients, cycle: Iterator[uuid.UUID]
) -> Callable[[], object]:
    return lambda: repo.get(id=next(cycle))


def _paying(
    repo: PhiPatients | CachedPhiPatients, cycle: Iterator[uuid.UUID], db: Database
) -> Callable[[], object]:
    """A read whose every SLICE-th call also writes what the slice recorded."""
    access = db._access
    assert access is not None
    calls = itertools.count(1)

    def read() -> object:
        value = repo.get(id=next(cycle))
        if next(calls) % SLICE == 0:
            access._flush(final=False)
        return value

    return read


if __name__ == "__main__":
    print(main())
