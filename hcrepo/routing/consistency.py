"""Read-your-writes: the WAL position a caller's reads must reflect.

After a COMMIT the primary's WAL insert position (LSN), read in the same round trip, is
recorded in the caller's block (`hcrepo.tenancy.Scope.writes`); a read in that block may only
be served by a replica that has replayed it, and a cached value only if it was filled after
it. To carry the guarantee across a process boundary (a queued job, the next HTTP request)
the position travels as a token: PostgreSQL's own LSN text, e.g. "16/B374D848", which fits a
job payload, a cookie or a header unescaped and compares as `pg_lsn` in SQL.

Positions are kept per cluster (the primary's address), so two `Database`s in one process
never force each other's reads to their primaries. A block's positions last as long as the
block; positions it was told to wait for (`awaiting`) last for the inner block.
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import MappingProxyType

from hcrepo import tenancy
from hcrepo.errors import HcrepoError

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
# PostgreSQL's defaults (XLOG_BLCKSZ, wal_segment_size) and page header sizes. With other
# sizes `commit_end` changes nothing, which only sends more reads to the primary.
_WAL_PAGE = 8192
_WAL_SEGMENT = 16 * 1024 * 1024
_SHORT_PAGE_HEADER = 24
_LONG_PAGE_HEADER = 40


class InvalidToken(HcrepoError, ValueError):
    """A read-your-writes token that is not an LSN such as "16/B374D848"."""


def parse_lsn(text: str) -> int:
    """"16/B374D848" -> 0x16B374D848; `InvalidToken` for anything else."""
    found = _LSN.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None:
        raise InvalidToken('a read-your-writes token looks like "16/B374D848"')
    return (int(found.group(1), 16) << 32) | int(found.group(2), 16)


def commit_end(insert_lsn: int) -> int:
    """The end of the last WAL record, given the insert position read right after it.

    When a record ends exactly at a WAL page boundary, the insert position already points
    past the next page's header, while a replica that replayed the record reports the
    boundary itself: without this, an idle replica would look behind forever.
    """
    if insert_lsn % _WAL_SEGMENT == _LONG_PAGE_HEADER:
        return insert_lsn - _LONG_PAGE_HEADER
    if insert_lsn % _WAL_PAGE == _SHORT_PAGE_HEADER:
        return insert_lsn - _SHORT_PAGE_HEADER
    return insert_lsn


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def record(positions: tenancy.Positions, cluster: str, lsn: str) -> None:
    """A commit whose insert position right after COMMIT was `lsn` happened in the block that
    holds `positions`: its later reads must see it."""
    positions.record(cluster, parse_lsn(lsn))


def replay_needed(position: int) -> int:
    """The replay position a replica needs to show everything up to `position` (0: none)."""
    return commit_end(position) if position else 0


def token(scope: tenancy.Scope, cluster: str) -> str | None:
    """What to hand on so another block sees everything `scope` has to see."""
    lsn = scope.required(cluster)
    return format_lsn(lsn) if lsn else None


def awaiting(cluster: str, token: str | None) -> tenancy.Block:
    """A block whose reads see at least the commit `token` names (None or "": no constraint).

    Writes made inside the block stay recorded in the outer block: only the wait ends.
    A malformed token raises `InvalidToken` here, before the block starts.
    """
    lsn = parse_lsn(token) if token else 0

    def derive(outer: tenancy.Scope) -> tenancy.Scope:
        if outer.awaited.get(cluster, 0) >= lsn:
            return outer
        return replace(outer, awaited=MappingProxyType({**outer.awaited, cluster: lsn}))

    return tenancy.Block(derive)
