"""An Iterator result streams through a server-side cursor: memory stays flat however many rows.

RSS is read from /proc/self/statm. The same 200k rows are first streamed (keeping nothing),
then fetched as a list: the list's growth shows what the stream avoided.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from hcrepo import Database, Repository, Settings, query
from tests.plugins.database import Database as ServerDatabase

ROWS = 200_000
MB = 1024 * 1024


class Generated(BaseModel):
    n: int
    payload: str


class Bulk(Repository, sql="sql/stream.sql", tenant=False):
    @query("generated_rows")
    def stream(self, *, count: int) -> Iterator[Generated]: ...

    @query("generated_rows")
    def fetch_all(self, *, count: int) -> list[Generated]: ...


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def bulk(migrated_db: ServerDatabase) -> Iterator[Bulk]:
    with Database(Settings(database_url=migrated_db.app_url, pool_min=1, pool_max=1)) as db:
        yield Bulk(db)


def test_streaming_200k_rows_keeps_memory_flat(bulk: Bulk) -> None:
    sum(row.n for row in bulk.stream(count=5_000))  # warm up: pool, prepared statements
    gc.collect()
    before = rss()
    peak = before
    total = 0
    for row in bulk.stream(count=ROWS):
        total += row.n
        if row.n % 10_000 == 0:
            peak = max(peak, rss())
    assert total == ROWS * (ROWS + 1) // 2
    streamed_growth = peak - before

    gc.collect()
    before_list = rss()
    rows = bulk.fetch_all(count=ROWS)
    listed_growth = rss() - before_list
    assert len(rows) == ROWS
    del rows

    assert streamed_growth < 8 * MB, f"streaming grew RSS by {streamed_growth / MB:.1f} MB"
    assert listed_growth > 40 * MB, f"the list grew RSS by only {listed_growth / MB:.1f} MB"
    assert listed_growth > 10 * max(streamed_growth, MB)
