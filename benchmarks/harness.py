"""Shared benchmark set-up: throw-away servers, a migrated and seeded database, and an
interleaved timer.

A shared virtual machine's CPU speed can swing about 2x within seconds, so variants are
never run one after the other: each round runs a short slice of every variant in turn, and
the reported figure is the median of the per-call times of all slices. A slice also runs
slower after a heavy neighbour (SQLAlchemy's slices evict the caches the next one needs), so
the order of each round comes from a Williams design: every variant follows every other one
equally often. A plain rotation had each variant always follow the same one, and moved
ratios by up to 10%. When the process may, the client is pinned to one core and the
PostgreSQL server to the other, so the backend a variant happens to get does not decide the
result.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

from hcrepo.admin import migrate
from hcrepo.testing import PostgresServer

OWNER_PASSWORD = "bench-owner"
APP_PASSWORD = "bench-app"
DBNAME = "hcrepo_bench"


@dataclass(frozen=True)
class Stack:
    server: PostgresServer
    superuser_url: str
    app_url: str
    clinic_id: uuid.UUID
    actor_id: uuid.UUID
    patient_ids: list[uuid.UUID]


def pin(server: PostgresServer) -> None:
    """Client on CPU 0, postmaster (and so every backend it forks later) on CPU 1."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    pid_file = server.data_dir / "postmaster.pid"
    try:
        postmaster = int(pid_file.read_text().split()[0])
        os.sched_setaffinity(postmaster, {cpus[1]})
        os.sched_setaffinity(0, {cpus[0]})
    except (OSError, ValueError, IndexError):
        pass  # not permitted here: the rotation of variants still keeps the run fair


@contextmanager
def stack(patients: int = 2000) -> Iterator[Stack]:
    """A primary with the schema applied and one clinic of `patients` patients."""
    with PostgresServer() as server:
        server.start()
        made = database(server, DBNAME, patients)
        pin(server)
        yield made


def database(server: PostgresServer, dbname: str, patients: int) -> Stack:
    """`dbname` on `server`, bootstrapped, migrated, with one clinic of `patients` patients
    (a second one on the same server compares a variant of the schema with the first)."""
    owner_url = migrate.bootstrap(server.superuser_url, database=dbname,
                                  owner_password=OWNER_PASSWORD)
    migrate.apply(owner_url, setting="owner URL")
    migrate.set_role_password(owner_url, migrate.APP_ROLE, APP_PASSWORD)
    superuser_url = server.url(password=server.superuser_password, dbname=dbname)
    clinic_id, actor_id = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute("INSERT INTO clinics (id, name) VALUES (%s, 'Bench Clinic')", (clinic_id,))
        rows = conn.execute(
            """INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth,
                   sex, phone, email, address)
               SELECT %s, 'MRN' || g, 'First' || g, 'Last' || (g %% 97), DATE '1950-01-01' + g,
                      'unknown', '+1 555 01' || g, 'p' || g || '@example.test',
                      g || ' Test Street'
               FROM generate_series(1, %s) AS g RETURNING id""",
            (clinic_id, patients),
        ).fetchall()
        conn.execute("VACUUM ANALYZE")
    return Stack(server, superuser_url,
                 server.url(user=migrate.APP_ROLE, password=APP_PASSWORD, dbname=dbname),
                 clinic_id, actor_id, [row[0] for row in rows])


def interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    rounds: int = 40,
    calls_per_slice: int = 50,
    warmup: int = 200,
) -> dict[str, float]:
    """Median microseconds per call of each variant, measured in short slices in balanced
    orders (`rounds` is rounded up to whole designs)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for order in balanced_rounds(rounds, names):
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(calls_per_slice):
                fn()
            samples[name].append((time.perf_counter() - start) / calls_per_slice * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def balanced_rounds(rounds: int, names: list[str]) -> Iterator[list[str]]:
    """At least `rounds` orders of `names`, in whole designs (a cut one is unbalanced)."""
    orders = balanced_orders(len(names))
    for round_number in range(-(-rounds // len(orders)) * len(orders)):
        yield [names[index] for index in orders[round_number % len(orders)]]


def balanced_orders(count: int) -> list[list[int]]:
    """Orders of `count` variants in which each one runs right after each other one equally
    often (a Williams design: 0, 1, n-1, 2, n-2, ... shifted; mirrored too when n is odd)."""
    first = [0]
    low, high = 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    orders = [[(index + shift) % count for index in first] for shift in range(count)]
    if count % 2:
        orders += [order[::-1] for order in orders]
    return orders


def table(medians: dict[str, float], baseline: str, title: str) -> str:
    lines = [f"### {title}", "", f"| variant | median µs/call | ratio vs {baseline} |",
             "|---|---:|---:|"]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.1f} | {value / medians[baseline]:.2f} |")
    return "\n".join(lines)
