"""`hcrepo audit verify`: walk every clinic's chain, recompute each link from audit.changes,
report the first broken link of each chain and what broke it.

- edited: the change's content (or the link's hash) no longer gives the link's hash;
- deleted: a link whose change is gone, or a position missing from the chain;
- inserted: a second link at a position, or a change the sealer's horizon has passed that
  no link holds (the sealer links every committed row below it);
- rewritten: the chain is consistent but disagrees with a signed digest's head (or is
  shorter than it): rebuilt from scratch by someone who could edit every row.

After a retention purge a chain starts after the purge's boundary link (audit.purges), from
the boundary's hash; links at or before it are not checked. Nothing is ever printed from a
change's content: a finding names the clinic, the position and the change id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

import psycopg

from hcrepo.compliance.chain import CANONICAL_COLUMNS, GENESIS, canonical, link_hash

Kind = Literal["edited", "deleted", "inserted", "rewritten"]

_BOUNDARIES_SQL = """
SELECT DISTINCT ON (clinic_id) clinic_id, boundary_seq, boundary_hash FROM audit.purges
WHERE clinic_id IS NOT NULL AND (%(clinic)s::uuid IS NULL OR clinic_id = %(clinic)s)
ORDER BY clinic_id, boundary_seq DESC
"""

_LINKS_SQL = f"""
SELECT k.clinic_id, k.seq, k.change_id, k.prev_hash, k.hash, c.clinic_id,
       {", ".join(CANONICAL_COLUMNS)}
FROM audit.chain AS k LEFT JOIN audit.changes AS c ON c.id = k.change_id
WHERE %(clinic)s::uuid IS NULL OR k.clinic_id = %(clinic)s
ORDER BY k.clinic_id, k.seq
"""

# Below the horizon every committed change is linked (audit.seal_state).
_UNLINKED_SQL = """
SELECT c.clinic_id, c.id FROM audit.changes AS c
WHERE c.id < (SELECT horizon FROM audit.seal_state)
  AND (%(clinic)s::uuid IS NULL OR c.clinic_id = %(clinic)s)
  AND NOT EXISTS (SELECT FROM audit.chain AS k WHERE k.change_id = c.id)
ORDER BY c.clinic_id, c.id
"""


@dataclass(frozen=True)
class Break:
    clinic_id: UUID
    seq: int | None  # None: a change no link holds
    kind: Kind
    change_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"link {self.seq}" if self.seq is not None else "unlinked change"
        change = f" (change {self.change_id})" if self.change_id is not None else ""
        return f"clinic {self.clinic_id}: {where}{change}: {self.kind}: {self.detail}"


@dataclass
class Verification:
    clinics: int = 0
    links: int = 0
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass
class _Walk:
    clinic_id: UUID
    seq: int
    prev: bytes
    broken: bool = False


def verify(
    conn: psycopg.Connection, *, clinic: UUID | None = None,
    heads: dict[UUID, tuple[int, bytes]] | None = None,
) -> Verification:
    """Walk the chains (one clinic's, or all); `heads` from a signed digest adds the
    rewritten-chain check. `conn` should hold one snapshot (auditor.session)."""
    params = {"clinic": clinic}
    starts = {UUID(str(c)): (int(s), bytes(h))
              for c, s, h in conn.execute(_BOUNDARIES_SQL, params).fetchall()}
    result = Verification()
    walks: dict[UUID, _Walk] = {}
    digest_hashes: dict[UUID, bytes] = {}
    with conn.cursor(name="hcrepo_audit_verify") as cursor:
        cursor.itersize = 2000
        cursor.execute(_LINKS_SQL, params)
        for row in cursor:
            link_clinic, seq, change_id = UUID(str(row[0])), int(row[1]), int(row[2])
            start_seq, start_hash = starts.get(link_clinic, (0, GENESIS))
            walk = walks.get(link_clinic)
            if walk is None:
                walk = walks[link_clinic] = _Walk(link_clinic, start_seq + 1, start_hash)
                result.clinics += 1
            if seq <= start_seq or walk.broken:
                continue  # purged up to the boundary, or already reported
            result.links += 1
            found = _check(walk, seq, change_id, bytes(row[3]), bytes(row[4]), row[5], row[6:])
            if heads is not None and link_clinic in heads and heads[link_clinic][0] == seq:
                digest_hashes[link_clinic] = bytes(row[4])
            if found is not None:
                result.breaks.append(found)
                walk.broken = True
                continue
            walk.seq, walk.prev = seq + 1, bytes(row[4])
    for clinic_id, change_id in conn.execute(_UNLINKED_SQL, params).fetchall():
        result.breaks.append(Break(UUID(str(clinic_id)), None, "inserted", int(change_id),
                                   "a change below the sealer's horizon that no link holds"))
    if heads is not None:
        result.breaks.extend(_against_digest(heads, walks, digest_hashes, starts, clinic))
    return result


def _check(
    walk: _Walk, seq: int, change_id: int, prev: bytes, stored: bytes,
    change_clinic: object, fields: tuple[str | None, ...],
) -> Break | None:
    clinic = walk.clinic_id
    if seq < walk.seq:
        return Break(clinic, seq, "inserted", change_id, "a second link at this position")
    if seq > walk.seq:
        return Break(clinic, walk.seq, "deleted", None,
                     f"links {walk.seq} to {seq - 1} are missing")
    if change_clinic is None:
        return Break(clinic, seq, "deleted", change_id, "the linked change is gone")
    if UUID(str(change_clinic)) != clinic:
        return Break(clinic, seq, "edited", change_id, "the change names another clinic")
    if prev != walk.prev:
        return Break(clinic, seq, "edited", change_id,
                     "the link's previous hash is not its predecessor's hash")
    if link_hash(clinic, seq, canonical(fields), walk.prev) != stored:
        return Break(clinic, seq, "edited", change_id,
                     "the change's content does not give the link's hash")
    return None


def _against_digest(
    heads: dict[UUID, tuple[int, bytes]], walks: dict[UUID, _Walk],
    found: dict[UUID, bytes], starts: dict[UUID, tuple[int, bytes]], clinic: UUID | None,
) -> list[Break]:
    breaks = []
    for clinic_id, (seq, signed) in sorted(heads.items()):
        if clinic is not None and clinic_id != clinic:
            continue
        if seq <= starts.get(clinic_id, (0, GENESIS))[0]:
            continue  # purged since the digest was signed
        walk = walks.get(clinic_id)
        if walk is not None and walk.broken and clinic_id not in found:
            continue  # already reported; the walk stopped before the signed head
        if clinic_id not in found:
            breaks.append(Break(clinic_id, seq, "rewritten", None,
                                "the chain is shorter than the signed digest's head"))
        elif found[clinic_id] != signed:
            breaks.append(Break(clinic_id, seq, "rewritten", None,
                                "the link differs from the signed digest's head: the chain "
                                "was rebuilt"))
    return breaks
