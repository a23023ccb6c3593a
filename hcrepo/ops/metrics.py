"""Prometheus metrics of hcrepo, in one registry of its own (`REGISTRY`).

Labels are query names and fixed words chosen by hcrepo, never argument or row values:
nothing a caller passes can reach a label (docs/architecture.md, invariant 7). Expose with
`prometheus_client.generate_latest(hcrepo.ops.metrics.REGISTRY)`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# --- cache (hcrepo.cache) -----------------------------------------------------------------

CACHE_HITS = Counter(
    "hcrepo_cache_hits", "Cached reads answered from Redis with a fresh value",
    ["query"], registry=REGISTRY,
)
CACHE_MISSES = Counter(
    "hcrepo_cache_misses", "Cached reads that found no valid value and read the database",
    ["query"], registry=REGISTRY,
)
CACHE_STALE = Counter(
    "hcrepo_cache_stale", "Reads answered with a value past its soft TTL while it is refreshed",
    ["query"], registry=REGISTRY,
)
CACHE_REFRESHES = Counter(
    "hcrepo_cache_refreshes", "Background refreshes of stale values started",
    ["query"], registry=REGISTRY,
)
CACHE_COALESCED = Counter(
    "hcrepo_cache_coalesced",
    "Misses that waited for another caller's database read instead of running their own",
    ["query", "via"], registry=REGISTRY,
)
CACHE_ERRORS = Counter(
    "hcrepo_cache_errors",
    "Redis failures and unreadable entries; the read was answered from the database",
    ["query", "kind"], registry=REGISTRY,
)
CACHE_BYPASSED = Counter(
    "hcrepo_cache_bypassed",
    "Cached reads sent straight to the database (Redis unavailable, invalidation pending, "
    "PHI without an encryption key, replica lag window)",
    ["query", "reason"], registry=REGISTRY,
)
CACHE_BYTES = Counter(
    "hcrepo_cache_bytes", "Bytes of cache entries read from and written to Redis",
    ["query", "direction"], registry=REGISTRY,
)
CACHE_INVALIDATION_FAILURES = Counter(
    "hcrepo_cache_invalidation_failures",
    "Invalidations that could not reach Redis and were queued for retry", registry=REGISTRY,
)
CACHE_PENDING_INVALIDATIONS = Gauge(
    "hcrepo_cache_pending_invalidations",
    "Tags whose invalidation is queued for retry in this process", registry=REGISTRY,
)
CACHE_BREAKERS_OPEN = Gauge(
    "hcrepo_cache_breakers_open", "Redis circuit breakers of caches in this process now open",
    registry=REGISTRY,
)

# --- repository calls (hcrepo.observer) ---------------------------------------------------

QUERY_SECONDS = Histogram(
    "hcrepo_query_seconds",
    "Wall time of repository calls, cache hits included, by query name",
    ["query", "kind"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
QUERY_ERRORS = Counter(
    "hcrepo_query_errors", "Repository calls that raised, by query name and error class",
    ["query", "error"], registry=REGISTRY,
)
SLOW_QUERIES = Counter(
    "hcrepo_slow_queries", "Repository calls slower than SLOW_QUERY_THRESHOLD", ["query"],
    registry=REGISTRY,
)

# --- PHI access log (hcrepo.compliance.access_log) ----------------------------------------

ACCESS_LOG_ROWS = Counter(
    "hcrepo_access_log_rows",
    "PHI access log rows by what became of them: written to the primary, spilled to disk, "
    "replayed from a spill file, or dropped (memory full and no spill directory)",
    ["outcome"], registry=REGISTRY,
)
ACCESS_LOG_ERRORS = Counter(
    "hcrepo_access_log_errors",
    "Failures of the PHI access log: writing to the primary, spilling, replaying, or "
    "reading patient ids off a result (the read itself was answered)",
    ["kind"], registry=REGISTRY,
)
ACCESS_LOG_WAITING = Gauge(
    "hcrepo_access_log_waiting", "PHI access log rows in memory, not yet written",
    registry=REGISTRY,
)
