"""Who viewed and who changed one patient: audit.access_log and audit.changes merged in
time order, read as hcrepo_auditor (the read itself logged in audit.auditor_log)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Literal
from uuid import UUID

from hcrepo.compliance import auditor

# One select per side, merged by the server; both sides use their patient index.
_TRAIL_SQL = """
SELECT at, kind, actor_id, clinic_id, staff_role, what, columns, source, emergency_reason
FROM (
    SELECT c.at, 'changed' AS kind, c.actor_id, c.clinic_id, c.staff_role,
           lower(c.action) || ' ' || c.table_name AS what, c.changed AS columns,
           NULL::text AS source, NULL::text AS emergency_reason, c.id AS tie
    FROM audit.changes AS c
    WHERE c.patient_id = %(patient)s AND c.at >= %(since)s
    UNION ALL
    SELECT a.recorded_at, 'viewed', a.actor_id, a.clinic_id, a.staff_role, a.query,
           '{}'::text[], a.source, a.emergency_reason, NULL
    FROM audit.access_log AS a
    WHERE a.patient_ids @> ARRAY[%(patient)s::uuid] AND a.recorded_at >= %(since)s
) AS t
ORDER BY at, tie NULLS FIRST
"""


@dataclass(frozen=True)
class TrailEntry:
    """One view or change. `what` is the query name of a view, or `<action> <table>` of a
    change, whose changed columns are `columns`; `source` is where a view was served."""

    at: datetime
    kind: Literal["viewed", "changed"]
    actor_id: UUID | None
    clinic_id: UUID
    staff_role: str | None
    what: str
    columns: tuple[str, ...]
    source: str | None
    emergency_reason: str | None


def patient_trail(
    url: str, patient_id: UUID | str, since: datetime | date | None = None, *,
    setting: str = "HCREPO_AUDITOR_URL",
) -> list[TrailEntry]:
    """Every view and change of one patient since `since` (a date: from its midnight UTC; a
    naive datetime: UTC), oldest first. `url` is hcrepo_auditor's; `setting` names it in
    connection errors."""
    patient = UUID(str(patient_id))
    start = _start(since)
    args = {"patient_id": str(patient), "since": start.isoformat()}
    with auditor.session(url, setting, "trail", args) as conn:
        rows = conn.execute(_TRAIL_SQL, {"patient": patient, "since": start}).fetchall()
    return [
        TrailEntry(at, kind, actor, clinic, role, what, tuple(columns or ()), source, reason)
        for at, kind, actor, clinic, role, what, columns, source, reason in rows
    ]


def _start(since: datetime | date | None) -> datetime:
    if since is None:
        return datetime.min.replace(tzinfo=UTC)
    if isinstance(since, datetime):
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    return datetime.combine(since, time.min, tzinfo=UTC)
