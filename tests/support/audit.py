"""Reading the audit trail as the superuser, for assertions."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

_CHANGES_SQL = """
SELECT id, action, table_name, row_id, actor_id, clinic_id, staff_role, db_role, patient_id,
       changed, old, new, txid::text AS txid
FROM audit.changes WHERE clinic_id = %s AND id > %s ORDER BY id
"""


def last_change_id(superuser_url: str) -> int:
    with psycopg.connect(superuser_url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM audit.changes").fetchone()
        assert row is not None
        return int(row[0])


def changes_after(superuser_url: str, clinic_id: UUID, after: int) -> list[dict[str, Any]]:
    """The audit rows of one clinic with an id above `after`, oldest first."""
    with psycopg.connect(superuser_url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        return cursor.execute(_CHANGES_SQL, [clinic_id, after]).fetchall()


def unlinked(superuser_url: str) -> int:
    """Audit rows no chain link holds."""
    with psycopg.connect(superuser_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM audit.changes AS c WHERE NOT EXISTS "
            "(SELECT FROM audit.chain AS k WHERE k.change_id = c.id)"
        ).fetchone()
        assert row is not None
        return int(row[0])


def superuser(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run `statement` as the superuser with every trigger off (session_replication_role),
    as a database administrator tampering with the trail would; return its rows."""
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []
