"""Retention: whole monthly partitions past the period are dropped and nothing else, each
purge recorded and chained, and verification afterwards starts at the purge boundary."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from hcrepo.compliance import retention
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import FreshDatabase, migrate_database
from tests.support.audit import superuser, unlinked
from tests.support.cli import assert_one_line, hcrepo
from tests.support.repos import new_clinic

OLD = datetime(2015, 1, 15, tzinfo=UTC)
KEY = "a digest key of at least 16 bytes"


@pytest.fixture
def server(fresh_database: FreshDatabase) -> ServerDatabase:
    made = fresh_database()
    migrate_database(made)
    return made


def _partitions(server: ServerDatabase, parent: str) -> set[str]:
    rows = superuser(server.superuser_url,
                     "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                     "WHERE i.inhparent = %s::regclass", [f"audit.{parent}"])
    return {name for (name,) in rows}


def _seal(server: ServerDatabase) -> None:
    assert hcrepo("audit", "seal", "--database", server.app_url).returncode == 0


def _old_rows(server: ServerDatabase, clinic_id: object, actor: object) -> None:
    """Audit and access-log rows of January 2015, in partitions made for them."""
    with psycopg.connect(server.owner_url) as conn:
        for parent in ("changes", "access_log", "chain"):
            conn.execute("SELECT audit.create_partition(%s, %s)", [parent, OLD.date()])
    with psycopg.connect(server.superuser_url) as conn:
        for n in range(3):
            conn.execute("INSERT INTO audit.changes (at, actor_id, clinic_id, action, table_name, "
                         "row_id, new) VALUES (%s, %s, %s, 'UPDATE', 'patients', %s, '{}')",
                         [OLD, actor, clinic_id, str(n)])
        conn.execute("INSERT INTO audit.access_log (recorded_at, clinic_id, query, patient_ids, "
                     "source) VALUES (%s, %s, 'PatientRepository.get', '{}', 'primary')",
                     [OLD, clinic_id])


def test_retention_drops_only_whole_partitions_past_the_period(
    server: ServerDatabase, tmp_path: Path
) -> None:
    clinic = new_clinic(server.superuser_url, patients=2)
    _old_rows(server, clinic.id, clinic.actor_id)
    # The month the cutoff falls in holds rows older than the period: kept, not whole.
    edge = retention.cutoff(2555)
    with psycopg.connect(server.owner_url) as conn:
        conn.execute("SELECT audit.create_partition('changes', %s)", [edge.date()])
    with psycopg.connect(server.superuser_url) as conn:
        conn.execute("INSERT INTO audit.changes (at, clinic_id, action, table_name) VALUES "
                     "(date_trunc('month', %s::timestamptz), %s, 'UPDATE', 'patients')",
                     [edge, clinic.id])
    _seal(server)
    owner = {"HCREPO_OWNER_URL": server.owner_url}
    auditor = {"HCREPO_AUDITOR_URL": server.auditor_url, "HCREPO_AUDIT_DIGEST_KEY": KEY}
    signed = hcrepo("audit", "digest", env=auditor)
    assert signed.returncode == 0, signed.stderr
    before = superuser(server.superuser_url, "SELECT count(*) FROM audit.changes")

    dry = hcrepo("retention", "--dry-run", env=owner)
    assert (dry.returncode, dry.stderr) == (0, "")
    assert dry.stdout.splitlines() == [
        "would drop audit.changes_p201501: 2015-01-01 to 2015-02-01, 3 rows",
        "would drop audit.access_log_p201501: 2015-01-01 to 2015-02-01, 1 rows",
    ]
    assert "changes_p201501" in _partitions(server, "changes")

    refused = hcrepo("retention", "--apply", env=owner)
    assert (refused.returncode, refused.stdout.count("\n")) == (2, 2)
    assert_one_line(refused.stderr, starts="hcrepo: retention: would drop 2 audit partitions: "
                    "give --yes")
    assert "changes_p201501" in _partitions(server, "changes")

    applied = hcrepo("retention", "--apply", "--yes", env=owner)
    assert (applied.returncode, applied.stderr) == (0, "")
    assert applied.stdout.endswith("dropped 2 partitions\n")
    for parent in ("changes", "access_log", "chain"):
        assert f"{parent}_p201501" not in _partitions(server, parent)
    assert f"changes_p{edge:%Y%m}" in _partitions(server, "changes")
    [(left,)] = superuser(server.superuser_url, "SELECT count(*) FROM audit.changes")
    # Three rows purged, two PURGE rows added (one per table).
    assert left == before[0][0] - 3 + 2
    purges = superuser(server.superuser_url, "SELECT table_name, partition, clinic_id, "
                       "boundary_seq, rows FROM audit.purges ORDER BY table_name")
    assert purges == [("audit.access_log", "access_log_p201501", None, None, 1),
                      ("audit.changes", "changes_p201501", clinic.id, 5, 3)]

    _seal(server)
    assert unlinked(server.superuser_url) == 0
    digest_file = tmp_path / "digest.json"
    digest_file.write_text(signed.stdout)
    verified = hcrepo("audit", "verify", "--digest", str(digest_file), env=auditor)
    assert (verified.returncode, verified.stderr) == (0, ""), verified.stdout
    assert verified.stdout.endswith(": ok\n")
    # The purges are chained in the system chain.
    [(purged,)] = superuser(server.superuser_url,
                            "SELECT count(*) FROM audit.changes c JOIN audit.chain k "
                            "ON k.change_id = c.id WHERE c.action = 'PURGE' AND k.clinic_id = "
                            "'00000000-0000-0000-0000-000000000000'")
    assert purged == 2
    again = hcrepo("retention", "--dry-run", env=owner)
    assert again.stdout == "nothing past retention\n"


def test_far_past_and_future_rows_land_in_the_default_partition_and_stay(
    server: ServerDatabase,
) -> None:
    clinic = new_clinic(server.superuser_url, patients=1)
    with psycopg.connect(server.app_url) as conn:
        for year in (1850, 2400):
            conn.execute("INSERT INTO audit.access_log (recorded_at, clinic_id, query, "
                         "patient_ids, source) VALUES (%s, %s, 'q', '{}', 'cache')",
                         [datetime(year, 1, 1, tzinfo=UTC), clinic.id])
    result = hcrepo("retention", "--apply", "--yes",
                    env={"HCREPO_OWNER_URL": server.owner_url})
    assert result.stdout == "nothing past retention\n"
    assert superuser(server.superuser_url,
                     "SELECT count(*) FROM audit.access_log_default") == [(2,)]


def test_partitions_are_made_ahead(server: ServerDatabase) -> None:
    now = datetime.now(UTC)
    ahead = {f"changes_p{(now.year * 12 + now.month - 1 + n) // 12}"
             f"{(now.month - 1 + n) % 12 + 1:02d}" for n in range(4)}
    assert ahead <= _partitions(server, "changes")


def test_retention_needs_the_owner_url() -> None:
    result = hcrepo("retention", "--dry-run")
    assert result.returncode == 2
    assert_one_line(result.stderr, starts="hcrepo: HCREPO_OWNER_URL: is required but not set")
    both = hcrepo("retention", "--dry-run", "--apply")
    assert both.returncode == 2 and "not allowed with" in both.stderr
