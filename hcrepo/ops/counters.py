"""Exact event counts that many threads bump on a hot path without taking a lock.

`next()` on an `itertools.count` is a single C call, so it is atomic under the GIL: no
increment is lost and no caller ever waits. (A lock here would be held for nanoseconds but
could still convoy 8 reader threads when the GIL switches inside it; `x += 1` loses updates.)
Reading the value is rare (stats, scrapes) and goes through the counter's repr, the one public
way to see an `itertools.count` without advancing it.
"""

from __future__ import annotations

import itertools


class Counter:
    __slots__ = ("_ticks",)

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def inc(self) -> None:
        next(self._ticks)

    @property
    def value(self) -> int:
        return int(repr(self._ticks)[len("count("):-1])


class Counters:
    """A fixed set of named counters: `counters.inc("failovers")`, `counters.snapshot()`."""

    __slots__ = ("_counters",)

    def __init__(self, *names: str) -> None:
        self._counters = {name: Counter() for name in names}

    def __getitem__(self, name: str) -> Counter:
        return self._counters[name]

    def inc(self, name: str) -> None:
        self._counters[name].inc()

    def snapshot(self) -> dict[str, int]:
        return {name: counter.value for name, counter in self._counters.items()}
