"""The hash chain: sealed in commit order by a sealer without serializing writers, verified
link by link, tampering by a superuser found at the right link and classified, a chain
rewritten from scratch caught by a signed digest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from uuid import UUID

import psycopg
import pytest

from hcrepo import Database, Settings
from hcrepo.compliance import auditor, digest
from hcrepo.compliance.sealer import seal_pending
from hcrepo.compliance.verify import Verification, verify
from hcrepo.healthcare import PatientRepository
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import FreshDatabase, migrate_database
from tests.support.audit import superuser, unlinked
from tests.support.repos import Clinic, new_clinic

KEY = b"a digest key of at least 16 bytes"
WAIT = 30.0


@pytest.fixture
def server(fresh_database: FreshDatabase) -> ServerDatabase:
    """A database of its own: these tests tamper with the trail."""
    made = fresh_database()
    migrate_database(made)
    return made


def _settings(server: ServerDatabase, **overrides: object) -> Settings:
    return Settings(database_url=server.app_url, redis_url="", pool_min=1, pool_max=10,
                    **overrides)


def _writes(server: ServerDatabase, clinic: Clinic, count: int) -> None:
    with Database(_settings(server, audit_sealer=False)) as db, db.context(
            clinic_id=clinic.id, actor_id=clinic.actor_id):
        for n in range(count):
            PatientRepository(db).rename(id=clinic.patient_ids[n % len(clinic.patient_ids)],
                                         first_name=f"N{n}", last_name="Chain")


def _seal(server: ServerDatabase) -> int:
    with psycopg.connect(server.app_url, autocommit=True) as conn:
        return seal_pending(conn)


def _verify(server: ServerDatabase, **options: object) -> Verification:
    with auditor.session(server.auditor_url, "auditor URL", "verify", {}) as conn:
        return verify(conn, **options)  # type: ignore[arg-type]


def _link(server: ServerDatabase, clinic: Clinic, seq: int) -> int:
    [(change_id,)] = superuser(server.superuser_url, "SELECT change_id FROM audit.chain "
                               "WHERE clinic_id = %s AND seq = %s", [clinic.id, seq])
    return int(change_id)


@pytest.fixture
def sealed(server: ServerDatabase) -> Iterator[tuple[Clinic, Clinic]]:
    """Two clinics with ten sealed changes each (their patients' inserts first)."""
    a = new_clinic(server.superuser_url, patients=2)
    b = new_clinic(server.superuser_url, patients=2)
    _writes(server, a, 8)
    _writes(server, b, 8)
    _seal(server)
    yield a, b


def test_a_clean_chain_verifies_and_every_change_is_linked_once(
    server: ServerDatabase, sealed: tuple[Clinic, Clinic]
) -> None:
    result = _verify(server)
    assert (result.ok, result.clinics, result.links) == (True, 2, 20)
    assert unlinked(server.superuser_url) == 0
    for clinic in sealed:
        seqs = superuser(server.superuser_url, "SELECT seq FROM audit.chain WHERE clinic_id = %s "
                         "ORDER BY seq", [clinic.id])
        assert [s for (s,) in seqs] == list(range(1, 11))
    assert _seal(server) == 0  # nothing left: sealing twice links nothing twice


def test_an_edited_row_is_found_at_its_link(server: ServerDatabase,
                                            sealed: tuple[Clinic, Clinic]) -> None:
    a, b = sealed
    change = _link(server, a, 6)
    superuser(server.superuser_url, "UPDATE audit.changes SET new = '{\"first_name\": \"X\"}' "
              "WHERE id = %s", [change])
    result = _verify(server)
    assert [(f.clinic_id, f.seq, f.kind, f.change_id) for f in result.breaks] == [
        (a.id, 6, "edited", change)]
    assert _verify(server, clinic=b.id).ok  # the other clinic's chain is intact
    assert "X" not in str(result.breaks[0])  # findings never quote the content


def test_an_edited_actor_is_found_too(server: ServerDatabase,
                                      sealed: tuple[Clinic, Clinic]) -> None:
    a, _ = sealed
    change = _link(server, a, 3)
    superuser(server.superuser_url, "UPDATE audit.changes SET actor_id = gen_random_uuid() "
              "WHERE id = %s", [change])
    assert [(f.seq, f.kind) for f in _verify(server, clinic=a.id).breaks] == [(3, "edited")]


def test_a_deleted_row_and_a_deleted_link_are_found(server: ServerDatabase,
                                                    sealed: tuple[Clinic, Clinic]) -> None:
    a, b = sealed
    change = _link(server, a, 4)
    superuser(server.superuser_url, "DELETE FROM audit.changes WHERE id = %s", [change])
    superuser(server.superuser_url, "DELETE FROM audit.chain WHERE clinic_id = %s AND seq = 7",
              [b.id])
    found = {(f.clinic_id, f.seq, f.kind) for f in _verify(server).breaks}
    assert found == {(a.id, 4, "deleted"), (b.id, 7, "deleted")}


def test_an_inserted_row_is_found(server: ServerDatabase, sealed: tuple[Clinic, Clinic]) -> None:
    a, b = sealed
    # A forged change backdated below the sealer's horizon, which no link holds ...
    superuser(server.superuser_url,
              "INSERT INTO audit.changes (id, clinic_id, action, table_name, actor_id) "
              "VALUES (0, %s, 'UPDATE', 'patients', %s)", [a.id, a.actor_id])
    # ... and one slipped into the chain at an existing position, hash recomputed.
    superuser(server.superuser_url,
              "INSERT INTO audit.changes (id, clinic_id, action, table_name) "
              "VALUES (-1, %s, 'DELETE', 'patients')", [b.id])
    superuser(server.superuser_url,
              "INSERT INTO audit.chain (clinic_id, seq, change_id, prev_hash, hash) "
              "SELECT k.clinic_id, 5, -1, k.hash, audit.link_hash(k.clinic_id, 5, "
              "audit.canonical(c), k.hash) FROM audit.chain k, audit.changes c "
              "WHERE k.clinic_id = %s AND k.seq = 4 AND c.id = -1", [b.id])
    breaks = _verify(server).breaks
    found = {(f.clinic_id, f.seq, f.kind, f.change_id) for f in breaks}
    assert (a.id, None, "inserted", 0) in found
    [at_b] = [f for f in breaks if f.clinic_id == b.id]
    assert (at_b.seq, at_b.kind) == (5, "inserted")


def test_a_chain_rewritten_from_scratch_is_caught_only_with_a_digest(
    server: ServerDatabase, sealed: tuple[Clinic, Clinic]
) -> None:
    a, _ = sealed
    with auditor.session(server.auditor_url, "auditor URL", "digest", {}) as conn:
        signed = digest.make(conn, KEY)
    heads = digest.signed_heads(signed, KEY)
    assert heads[a.id][0] == 10
    # Edit a row, throw the chain away and let the sealer build a consistent new one.
    change = _link(server, a, 2)
    superuser(server.superuser_url, "UPDATE audit.changes SET new = '{}' WHERE id = %s", [change])
    superuser(server.superuser_url, "DELETE FROM audit.chain")
    superuser(server.superuser_url, "UPDATE audit.seal_state SET horizon = 1")
    _seal(server)
    assert _verify(server).ok  # consistent in itself
    result = _verify(server, heads=heads)
    assert [(f.clinic_id, f.seq, f.kind) for f in result.breaks] == [(a.id, 10, "rewritten")]
    # A forged digest of the new heads is refused.
    forged = {**signed, "heads": {**signed["heads"], str(a.id): {"seq": 10, "hash": "00"}}}
    with pytest.raises(digest.DigestInvalid, match="HMAC"):
        digest.signed_heads(forged, KEY)
    with pytest.raises(digest.DigestInvalid, match="HMAC"):
        digest.signed_heads(signed, b"another key of sixteen bytes")


def test_a_truncated_chain_is_caught_with_a_digest(
    server: ServerDatabase, sealed: tuple[Clinic, Clinic]
) -> None:
    a, _ = sealed
    with auditor.session(server.auditor_url, "auditor URL", "digest", {}) as conn:
        heads = digest.signed_heads(digest.make(conn, KEY), KEY)
    superuser(server.superuser_url, "DELETE FROM audit.changes WHERE id IN (SELECT change_id "
              "FROM audit.chain WHERE clinic_id = %s AND seq >= 9)", [a.id])
    superuser(server.superuser_url, "DELETE FROM audit.chain WHERE clinic_id = %s AND seq >= 9",
              [a.id])
    assert _verify(server).ok  # the tail is simply gone
    assert [(f.seq, f.kind) for f in _verify(server, heads=heads).breaks] == [(10, "rewritten")]


def test_a_late_commit_is_sealed_after_the_horizon_passed_later_ids(
    server: ServerDatabase,
) -> None:
    clinic = new_clinic(server.superuser_url, patients=2)
    _seal(server)
    # A transaction takes an audit id, then waits while later ids commit and get sealed.
    slow = psycopg.connect(server.app_url)
    try:
        slow.execute("SELECT set_config('app.clinic_id', %s, true), "
                     "set_config('app.actor_id', %s, true)", [str(clinic.id), str(clinic.actor_id)])
        slow.execute("UPDATE patients SET phone = 'late' WHERE id = %s", [clinic.patient_ids[1]])
        _writes(server, replace(clinic, patient_ids=clinic.patient_ids[:1]), 4)
        for _ in range(3):
            _seal(server)
        slow.commit()
    finally:
        slow.close()
    _seal(server)
    _seal(server)
    assert unlinked(server.superuser_url) == 0
    assert _verify(server).ok


def test_eight_writers_of_one_clinic_with_the_sealer_running(server: ServerDatabase) -> None:
    clinic = new_clinic(server.superuser_url, patients=8)
    start = threading.Barrier(8)
    failures: list[BaseException] = []
    rounds = 40

    def write(db: Database, patient: UUID) -> None:
        try:
            start.wait(WAIT)
            with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
                for n in range(rounds):
                    if n % 4 == 0:
                        with db.unit_of_work() as uow:
                            PatientRepository(uow).rename(id=patient, first_name=f"U{n}",
                                                          last_name="W")
                            PatientRepository(uow).update_contact(
                                id=patient, phone=f"{n}", email=None, address=None)
                    else:
                        PatientRepository(db).rename(id=patient, first_name=f"P{n}",
                                                     last_name="W")
        except BaseException as exc:
            failures.append(exc)

    with Database(_settings(server, audit_seal_interval=0.05)) as db:
        threads = [threading.Thread(target=write, args=(db, p)) for p in clinic.patient_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
        # Sealed while running, not only at close.
        deadline = time.monotonic() + WAIT
        while unlinked(server.superuser_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unlinked(server.superuser_url) == 0
    assert failures == []
    result = _verify(server)
    assert result.ok
    assert result.links == 8 + 8 * (rounds + rounds // 4)


def test_close_seals_what_this_process_wrote(server: ServerDatabase) -> None:
    clinic = new_clinic(server.superuser_url, patients=1)
    # An interval no test waits for: only the final seal on close can link the rows.
    with Database(_settings(server, audit_seal_interval=3600)) as db, db.context(
            clinic_id=clinic.id, actor_id=clinic.actor_id):
        PatientRepository(db).rename(id=clinic.patient_ids[0], first_name="Z", last_name="Z")
        assert unlinked(server.superuser_url) == 2
    assert unlinked(server.superuser_url) == 0


def test_one_sealer_at_a_time(server: ServerDatabase) -> None:
    clinic = new_clinic(server.superuser_url, patients=1)
    with psycopg.connect(server.app_url) as holder:
        holder.execute("SELECT audit.seal(1)")  # holds the advisory lock until it ends
        assert _seal(server) == 0  # the second sealer does not wait, it leaves
        holder.rollback()
    assert _seal(server) == 1
    assert unlinked(server.superuser_url) == 0 and clinic


def test_the_auditors_use_is_logged(server: ServerDatabase, sealed: tuple[Clinic, Clinic]) -> None:
    _verify(server, clinic=sealed[0].id)
    rows = superuser(server.superuser_url, "SELECT db_role, command FROM audit.auditor_log")
    assert rows == [("hcrepo_auditor", "verify")]
