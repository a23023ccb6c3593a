"""The hash chain's arithmetic, shared by `hcrepo audit verify` and its tests.

audit.seal (migrations/0006_audit.sql) computes the same hashes in PostgreSQL; the two must
agree byte for byte. A change is hashed over the text forms of its columns, each written as
`<bytes>:<text>;` (a NULL as `~;`), in the order of CANONICAL_COLUMNS, which is the order of
audit.canonical. Lengths make the encoding unambiguous whatever the text holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from uuid import UUID

# The predecessor of every clinic's first link.
GENESIS = bytes(32)
# Purges are chained in the system chain, under the nil clinic.
SYSTEM_CLINIC = UUID(int=0)

# The select-list of the canonical text forms of audit.changes AS c, as audit.canonical
# writes them: timestamps in UTC whatever the session's TimeZone.
CANONICAL_COLUMNS = (
    "c.id::text",
    "to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    "c.txid::text",
    "c.actor_id::text",
    "c.clinic_id::text",
    "c.staff_role",
    "c.db_role",
    "c.action",
    "c.table_name",
    "c.row_id",
    "c.patient_id::text",
    "c.changed::text",
    "c.old::text",
    "c.new::text",
)


def canonical(fields: Sequence[str | None]) -> bytes:
    """The bytes audit.canonical hashes, from the texts of CANONICAL_COLUMNS."""
    parts = []
    for text in fields:
        if text is None:
            parts.append(b"~;")
        else:
            raw = text.encode()
            parts.append(b"%d:%s;" % (len(raw), raw))
    return b"".join(parts)


def link_hash(clinic_id: UUID, seq: int, content: bytes, prev: bytes) -> bytes:
    """audit.link_hash: sha256 over the link's clinic and position, the change, the predecessor."""
    return hashlib.sha256(f"{clinic_id}|{seq}|".encode() + content + prev).digest()
