"""The one place every repository call is measured: latency histogram, error counter and the
slow-query log.

Only the query's name, its `file:line` and the error's class are recorded: never arguments,
rows or driver messages, which may hold PHI (docs/architecture.md, invariant 7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.metrics import Histogram

from hcrepo.ops import metrics
from hcrepo.phi.logs import logger

if TYPE_CHECKING:
    from hcrepo.plan import Plan


class Observer:
    """Per-Database: the slow-query threshold is a setting (SLOW_QUERY_THRESHOLD, ms)."""

    def __init__(self, slow_query_ms: float) -> None:
        self.slow_seconds = slow_query_ms / 1000 if slow_query_ms > 0 else float("inf")
        self._latency: dict[str, Histogram] = {}

    def finished(self, plan: Plan, seconds: float) -> None:
        latency = self._latency.get(plan.name)
        if latency is None:
            kind = "write" if plan.is_write else "read"
            latency = self._latency[plan.name] = metrics.QUERY_SECONDS.labels(plan.name, kind)
        latency.observe(seconds)
        if seconds >= self.slow_seconds:
            metrics.SLOW_QUERIES.labels(plan.name).inc()
            logger.warning(
                "slow query {query} ({source}) took {ms:.1f} ms",
                query=plan.name, source=plan.source, ms=seconds * 1000,
            )

    def failed(self, plan: Plan, error: BaseException) -> None:
        metrics.QUERY_ERRORS.labels(plan.name, type(error).__name__).inc()
