"""Read-your-writes through the cache, on a real primary, replica and Redis: an entry filled
before a caller's last write is never served to that caller, tagged or not, nor is the value
of an in-process fill that began before it. Callers with no write position may still get
an untagged entry from before the write, until its TTL (see hcrepo.cache)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from hcrepo import Database
from hcrepo.repository import Runner
from hcrepo.testing import PostgresServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import WaitReplayed
from tests.support.cache import CachedDatabase, CacheRepo, CacheRepoUntagged, Counts, Gate, until
from tests.support.repos import Clinic, Clinical, new_clinic

R = TypeVar("R")


@pytest.fixture
def db(
    cached_db: CachedDatabase, migrated_db: ServerDatabase, pg_replica: PostgresServer,
) -> Database:
    return cached_db(read_replica_urls=[migrated_db.replica_app_url(pg_replica)])


@pytest.fixture
def replayed_clinic(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, wait_replayed: WaitReplayed
) -> Clinic:
    made = new_clinic(migrated_db.superuser_url, patients=2)
    wait_replayed(pg_replica)
    return made


def elsewhere(fn: Callable[[], R]) -> R:
    """`fn()` in a thread of its own: no context, no read-your-writes position."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=30)


def add_patient(runner: Runner, clinic: Clinic) -> None:
    """An insert that invalidates nothing: only positions keep the count honest."""
    Clinical(runner).add_patient(clinic_id=clinic.id, mrn=f"ryw-{uuid.uuid4().hex[:10]}")


def test_a_callers_writes_are_never_hidden_by_an_untagged_entry(
    db: Database, replayed_clinic: Clinic
) -> None:
    clinic = replayed_clinic
    repo = CacheRepoUntagged(db)

    def count_as_another_request() -> int:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            return repo.count()

    counts = Counts("cache_patient_count")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        assert repo.count() == 2
        assert repo.count() == 2
        with db.unit_of_work() as uow:
            add_patient(uow, clinic)
        assert elsewhere(count_as_another_request) == 2  # no position: the entry, until TTL
        assert repo.count() == 3  # the entry predates this caller's commit: refilled
        assert elsewhere(count_as_another_request) == 3  # the refill replaced it
        add_patient(db, clinic)  # an autocommit write through the Database itself
        assert repo.count() == 4
    assert counts["misses"] == 3 and counts["hits"] == 3


def test_a_read_after_token_in_another_thread_sees_the_write(
    db: Database, replayed_clinic: Clinic
) -> None:
    clinic = replayed_clinic
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        assert CacheRepoUntagged(db).count() == 2
        add_patient(db, clinic)
        token = db.last_write_token()
    assert token is not None

    def count_after(waited: str | None) -> Callable[[], int]:
        def count() -> int:
            with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id), \
                    db.read_after(waited):
                return CacheRepoUntagged(db).count()

        return count

    assert elsewhere(count_after(None)) == 2
    assert elsewhere(count_after(token)) == 3


def test_a_fill_in_flight_from_before_a_callers_write_is_not_handed_to_it(
    db: Database, replayed_clinic: Clinic, gate: Gate
) -> None:
    clinic = replayed_clinic
    seen: dict[str, int] = {}
    counts = Counts("cache_gated_count")

    def lead() -> None:
        # A position no replica has replayed sends this read to the primary, where the gate
        # holds it after its snapshot was taken.
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id), \
                db.read_after("FFFFFFFF/0"):
            seen["leader"] = CacheRepo(db).gated_count(gate=gate.key)

    def write_then_read() -> None:
        with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
            add_patient(db, clinic)
            seen["writer"] = CacheRepo(db).gated_count(gate=gate.key)

    leader = threading.Thread(target=lead)
    leader.start()
    until(lambda: gate.waiting() == 1, what="the leader inside its database read")
    writer = threading.Thread(target=write_then_read)
    writer.start()
    try:
        until(lambda: counts["coalesced_process"] == 1, what="the writer to join the flight")
    finally:
        gate.open()
        leader.join(timeout=30)
        writer.join(timeout=30)
    assert seen == {"leader": 2, "writer": 3}
