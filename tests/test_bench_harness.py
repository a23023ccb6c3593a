"""The benchmark harness's slice order: a variant's time depends on the one run before it."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.harness import balanced_orders


@pytest.mark.parametrize("count", range(2, 10))
def test_every_variant_follows_every_other_equally_often(count: int) -> None:
    orders = balanced_orders(count)
    assert all(sorted(order) == list(range(count)) for order in orders)
    followers = Counter(
        (order[i], order[i + 1]) for order in orders for i in range(count - 1)
    )
    assert set(followers) == {(a, b) for a in range(count) for b in range(count) if a != b}
    assert len(set(followers.values())) == 1
