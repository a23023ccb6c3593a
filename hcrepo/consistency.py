"""Read-your-writes: the WAL position a caller's reads must reflect (invariant 5).

After a COMMIT the primary's WAL insert position (LSN) is recorded in the current context;
a read in that context may only be served by a replica that has replayed it. To carry the
guarantee across a process boundary (a queued job, the next HTTP request) the position
travels as a token: PostgreSQL's own LSN text, e.g. "16/B374D848", which fits a job payload,
a cookie or a header unescaped and compares as `pg_lsn` in SQL.

Positions are kept per cluster (the primary's address), so two `Database`s in one process
never force each other's reads to their primaries. Positions a context wrote stay for the
life of the context; positions it was told to wait for (`awaiting`) last for the block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

from hcrepo.errors import HcrepoError

_NONE: Mapping[str, int] = MappingProxyType({})
_written: ContextVar[Mapping[str, int]] = ContextVar("hcrepo_written_lsn", default=_NONE)
_awaited: ContextVar[Mapping[str, int]] = ContextVar("hcrepo_awaited_lsn", default=_NONE)

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


def record(cluster: str, lsn: int) -> None:
    """A commit at `lsn` happened in this context: its later reads must see it."""
    written = _written.get()
    if written.get(cluster, 0) < lsn:
        _written.set(MappingProxyType({**written, cluster: lsn}))


def required(cluster: str) -> int:
    """The LSN a read in this context must see on `cluster`; 0 when any replica will do."""
    return max(_written.get().get(cluster, 0), _awaited.get().get(cluster, 0))


def token(cluster: str) -> str | None:
    """What to hand on so another context sees everything this one has to see."""
    lsn = required(cluster)
    return format_lsn(lsn) if lsn else None


@contextmanager
def awaiting(cluster: str, token: str | None) -> Iterator[None]:
    """Reads in the block see at least the commit `token` names (None or "": no constraint).

    Writes made inside the block stay recorded after it: only the awaited position ends.
    """
    if not token:
        yield
        return
    lsn = parse_lsn(token)
    awaited = _awaited.get()
    reset = None
    if awaited.get(cluster, 0) < lsn:
        reset = _awaited.set(MappingProxyType({**awaited, cluster: lsn}))
    try:
        yield
    finally:
        if reset is not None:
            _awaited.reset(reset)
