"""Retention of the audit trail and the access log: whole monthly partitions older than the
retention period are detached and dropped (audit.purge), the one removal the append-only
rules allow. Each purge is recorded in audit.purges and, as a PURGE change, in the system
chain; verification then starts each clinic chain at the purge's boundary link. Runs as the
owner role (it drops tables), and makes the partitions of the months ahead as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hcrepo.admin.connect import connect

# The retained tables and the setting of each one's period.
TABLES = {"changes": "AUDIT_RETENTION_DAYS", "access_log": "ACCESS_LOG_RETENTION_DAYS"}


@dataclass(frozen=True)
class Partition:
    table: str
    name: str
    start: datetime
    end: datetime
    rows: int

    def __str__(self) -> str:
        return (f"audit.{self.name}: {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}, "
                f"{self.rows} rows")


def cutoff(days: int, now: datetime | None = None) -> datetime:
    """Partitions that end at or before this instant are wholly outside the window."""
    return (now or datetime.now(UTC)) - timedelta(days=days)


def purge(
    owner_url: str, cutoffs: dict[str, datetime], *, apply: bool,
    setting: str = "HCREPO_OWNER_URL",
) -> list[Partition]:
    """The partitions of each table in `cutoffs` ("changes", "access_log") that end at or
    before its cutoff; dropped when `apply`, in one transaction per table."""
    found = []
    with connect(owner_url, setting) as conn:
        for table, before in cutoffs.items():
            rows = conn.execute("SELECT * FROM audit.purge(%s, %s, %s)",
                                [table, before, apply]).fetchall()
            found += [Partition(table, name, start, end, int(count))
                      for name, start, end, count in rows]
            conn.commit()
    return found
