"""Reads through the router: 8 threads, a primary and 2 streaming replicas .

Throughput of point reads by primary key, measured in interleaved short slices (in the
harness's balanced orders, median of the slices), all in one process against the same two
replicas; the raw variants keep one psycopg_pool per replica and alternate between them:

- raw psycopg_pool, query only: one `conn.execute()` as the superuser, no tenant context and
  no RLS: less server work than any hcrepo read, shown for scale;
- raw psycopg_pool, same work: as hcrepo_app under RLS, the transaction-local clinic context
  and the query in one psycopg pipeline (one round trip): the hand-written equivalent, and
  the baseline of the target;
- hcrepo's statements on raw pools: the exact statements hcrepo sends, through
  hcrepo.pipeline, without the router: the router's own cost is the gap to the next line;
- hcrepo Database: a repository method through the router (health monitor running,
  breakers, checkout bookkeeping for leaks, counters);
- the same in threads that carry a caught-up read-your-writes token (`db.read_after`) for a
  commit both replicas have replayed; the router's counters show no replay-position refresh
  and no primary read during the run: the check used the monitor's cached position.

Target: hcrepo / raw psycopg_pool (same work) >= 0.9; the token costs no round trip.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg_pool

from benchmarks.bench_point_read import SQL, Patients
from benchmarks.harness import APP_PASSWORD, DBNAME, balanced_rounds, pin, stack
from hcrepo import Database, Repository, Settings, query
from hcrepo import pipeline as hc_pipeline
from hcrepo.admin import migrate
from hcrepo.execution import context_statement
from hcrepo.pipeline import HcConnection, Statement
from hcrepo.tenancy import Context
from hcrepo.testing import PostgresServer, wait_for_replay

SQL_DIR = Path(__file__).parent / "sql"
RAW = "raw psycopg_pool, query only (superuser: no context, no RLS)"
RAW_SAME = "raw psycopg_pool, same work (context + query in one pipeline, RLS)"
NO_ROUTER = "hcrepo's statements on raw pools (no router)"
BARE = "hcrepo's pipeline, query only (superuser: no context, no RLS)"
ROUTED = "hcrepo Database (router)"
TOKEN = "hcrepo Database, caught-up token"
_SET_CONTEXT = (
    "SELECT set_config('app.clinic_id', %s, true), set_config('app.actor_id', %s, true)"
)
THREADS = 8
CALLS_PER_THREAD = 25  # one slice: THREADS x CALLS_PER_THREAD reads
ROUNDS = 30
WARMUP_ROUNDS = 3


class Writes(Repository, sql=str(SQL_DIR / "routing.sql")):
    @query("touch_patient")
    def touch(self, *, id: uuid.UUID) -> int: ...


class Crew:
    """THREADS long-lived threads that run one variant per slice, all started together."""

    def __init__(self, setup: Callable[[], object]) -> None:
        self._setup = setup
        self._fn: Callable[[], object] | None = None
        self._start = threading.Barrier(THREADS + 1)
        self._end = threading.Barrier(THREADS + 1)
        self._threads = [threading.Thread(target=self._work, daemon=True)
                         for _ in range(THREADS)]
        for thread in self._threads:
            thread.start()

    def slice(self, fn: Callable[[], object]) -> float:
        """Reads per second of one slice of `fn`."""
        self._fn = fn
        self._start.wait(60)
        began = time.perf_counter()
        self._end.wait(60)
        return THREADS * CALLS_PER_THREAD / (time.perf_counter() - began)

    def stop(self) -> None:
        self._fn = None
        self._start.wait(60)
        for thread in self._threads:
            thread.join(60)

    def _work(self) -> None:
        # e.g. enter the clinic context once per thread, as a request would; kept referenced
        # for the thread's life (a collected context manager would leave its block).
        entered = self._setup()
        try:
            while True:
                self._start.wait(60)
                fn = self._fn
                if fn is None:
                    return
                for _ in range(CALLS_PER_THREAD):
                    fn()
                self._end.wait(60)
        except BaseException:
            self._start.abort()  # fail the run now, not after a barrier timeout
            self._end.abort()
            raise
        finally:
            del entered


Variant = tuple[Crew, Callable[[], object]]


def measure(variants: dict[str, Variant]) -> dict[str, float]:
    """Median reads/s of each variant over interleaved slices in balanced orders."""
    names = list(variants)
    for _ in range(WARMUP_ROUNDS):
        for name in names:
            crew, fn = variants[name]
            crew.slice(fn)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in balanced_rounds(ROUNDS, names):
        for name in order:
            crew, fn = variants[name]
            samples[name].append(crew.slice(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def _app_url(server: PostgresServer) -> str:
    return server.url(user=migrate.APP_ROLE, password=APP_PASSWORD, dbname=DBNAME)


def _pools(urls: list[str], **options: Any) -> list[psycopg_pool.ConnectionPool[Any]]:
    pools: list[psycopg_pool.ConnectionPool[Any]] = [
        psycopg_pool.ConnectionPool(url, min_size=THREADS, max_size=THREADS, open=True,
                                    **options)
        for url in urls
    ]
    for pool in pools:
        pool.wait()
    return pools


def main() -> str:
    with stack() as s:
        replicas = [s.server.create_replica() for _ in range(2)]
        for replica in replicas:
            wait_for_replay(replica, s.server.current_wal_lsn())
            pin(replica)
        ids = itertools.cycle(s.patient_ids[:500])
        turn = itertools.count()
        context = Context(s.clinic_id, s.actor_id)
        app_urls = [_app_url(replica) for replica in replicas]
        superuser_pools = _pools(
            [r.url(password=r.superuser_password, dbname=DBNAME) for r in replicas],
            kwargs={"autocommit": True},
        )
        app_pools = _pools(app_urls, kwargs={"autocommit": True})
        hc_pools = _pools(app_urls, connection_class=HcConnection,
                          kwargs={"autocommit": True, "prepare_threshold": None})
        bare_pools = _pools(
            [r.url(password=r.superuser_password, dbname=DBNAME) for r in replicas],
            connection_class=HcConnection,
            kwargs={"autocommit": True, "prepare_threshold": None},
        )
        plan = Patients.__plans__["get"]

        def raw_query_only() -> object:
            with superuser_pools[next(turn) % 2].connection() as conn:
                return conn.execute(SQL, (next(ids),)).fetchone()

        def raw_same_work() -> object:
            # What a careful hand-written read does under RLS: context + query, one pipeline.
            # In autocommit, statements before the pipeline's Sync share one implicit
            # transaction, so the transaction-local context applies to the query.
            with app_pools[next(turn) % 2].connection() as conn, conn.pipeline():
                conn.execute(_SET_CONTEXT, context.settings)
                return conn.execute(SQL, (next(ids),)).fetchone()

        def hcrepo_without_router() -> object:
            statements = [context_statement(context), Statement(plan.sql, (next(ids),))]
            with hc_pools[next(turn) % 2].connection() as conn:
                results = hc_pipeline.run(conn, statements)
                return plan.shape.build(results[-1], conn.transformer, plan.name, plan.source)

        def hcrepo_query_only() -> object:
            with bare_pools[next(turn) % 2].connection() as conn:
                results = hc_pipeline.run(conn, [Statement(plan.sql, (next(ids),))])
                return plan.shape.build(results[-1], conn.transformer, plan.name, plan.source)

        assert raw_same_work() is not None, "the raw variant's context was not applied"
        db = Database(Settings(database_url=s.app_url, read_replica_urls=app_urls,
                               pool_min=THREADS, pool_max=THREADS, redis_url=""))
        with db:
            repo = Patients(db)
            with db.context(clinic_id=s.clinic_id, actor_id=s.actor_id):
                assert repo.get(id=s.patient_ids[0]) is not None, "RLS context not applied"
                # A commit's token, replayed everywhere and seen by the monitor.
                assert Writes(db).touch(id=s.patient_ids[0]) == 1
                token = db.last_write_token()
            assert token is not None
            for replica in replicas:
                wait_for_replay(replica, s.server.current_wal_lsn())
            db._router.monitor.check_now()

            def enter(*blocks: Callable[[], AbstractContextManager[Any]]) -> Callable[[], object]:
                def setup() -> object:
                    entered = [block() for block in blocks]
                    for manager in entered:
                        manager.__enter__()
                    return entered

                return setup

            clinic = partial(db.context, clinic_id=s.clinic_id, actor_id=s.actor_id)
            plain = Crew(setup=enter(clinic))
            carrying_token = Crew(setup=enter(clinic, partial(db.read_after, token)))
            before = _served(db)

            def read() -> object:
                return repo.get(id=next(ids))

            medians = measure({
                RAW: (plain, raw_query_only),
                RAW_SAME: (plain, raw_same_work),
                NO_ROUTER: (plain, hcrepo_without_router),
                BARE: (plain, hcrepo_query_only),
                ROUTED: (plain, read),
                TOKEN: (carrying_token, read),
            })
            after = _served(db)
            plain.stop()
            carrying_token.stop()
        for pools in (superuser_pools, app_pools, hc_pools, bare_pools):
            for pool in pools:
                pool.close()
    return _report(medians, *(a - b for a, b in zip(after, before, strict=True)))


def _served(db: Database) -> tuple[int, int, int]:
    """(reads served by replicas, by the primary, replay-position refreshes) so far."""
    nodes = db._router.stats()["nodes"]
    replicas = [value for name, value in nodes.items() if name != "primary"]
    return (sum(node["served"] for node in replicas), nodes["primary"]["served"],
            sum(node["replay_refreshes"] for node in replicas))


def _report(medians: dict[str, float], replica_reads: int, primary_reads: int,
            refreshes: int) -> str:
    lines = [
        f"### Reads through the router: {THREADS} threads, 2 replicas (median of {ROUNDS} "
        "interleaved slices)", "",
        f"| variant | reads/s | ratio vs {RAW_SAME.split(' (')[0]} |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {value:,.0f} | {value / medians[RAW_SAME]:.2f} |"
              for name, value in medians.items()]
    lines += [
        "",
        f"hcrepo through the router / raw psycopg_pool doing the same work = "
        f"{medians[ROUTED] / medians[RAW_SAME]:.2f} (target >= 0.9); / hcrepo's own "
        f"statements on raw pools (the router's own cost) = "
        f"{medians[ROUTED] / medians[NO_ROUTER]:.2f}; / a raw query without tenant context "
        f"or RLS = {medians[ROUTED] / medians[RAW]:.2f}.",
        f"Caught-up token / no token = {medians[TOKEN] / medians[ROUTED]:.2f}. During the run "
        f"{replica_reads:,} reads were served by the replicas, {primary_reads} by the primary, "
        f"with {refreshes} replay-position refreshes: a caught-up token added no round trip.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
