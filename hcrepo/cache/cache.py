"""Redis cache for repository reads: tenant-safe, invalidated after commit, never in the way.

A read (`fetch`) costs one MGET: the value and the generation tokens of its tags (see
hcrepo.cache.store). A valid value before its soft TTL is a hit; past it, the stale
value is served while exactly one caller, cluster-wide, refreshes it in the background
(XFetch may start that refresh a little early). A miss fills under a Redis lock: threads of
one process share one flight, other processes wait a bounded time for the lock holder's
value, so a burst of misses costs one database query.

Redis never fails a read: errors and timeouts trip a circuit breaker (one warning, a metric)
and reads go to the database until a probe succeeds. An invalidation that cannot reach Redis
is queued and retried in the background; until it lands, this process reads past the cache,
and other processes can see the old value for at most its TTL, which is its Redis expiry.

PHI (`phi=True` queries) is cached only AES-GCM-encrypted. With no HCREPO_CACHE_ENCRYPTION_KEY
such queries are not cached at all: one warning per query, then a metric per call.

With read replicas an invalidation leaves tombstones for the lag window (HCREPO_MAX_LAG_SECONDS
plus two health intervals): a fill in that window may come from a replica that has not
replayed the commit yet, so it is returned but not stored.

Who asks is part of the key: every policy input the database sees (`tenancy.POLICY_INPUTS`:
the actor, the staff role and a recorded break-glass besides the clinic) is hashed into it
(with no role claimed, the actor stands in for the role the database derives from it),
unless the query declares `@cached(independent_of=...)`; hcrepo refuses that declaration for
SQL that reads the setting, and `hcrepo check` reports it for tables whose row-level security
policies do.

Read-your-writes: each entry records a WAL position its value is known to reflect (the
replica's replay position, or just below the primary's insert position, read before the
query). A caller whose reads must reflect a later position (its own commits, or a
`read_after` token) treats an older entry as a miss and refills it, so it never gets a value
from before its write, tagged or not. Another caller, with no such position, may still be
served an untagged entry filled before that write until the entry's TTL: tags are what
makes a write visible to everyone.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hcrepo.cache.codec import (
    Unreadable,
    read_header,
)
from hcrepo.cache.invalidation import Groups, Invalidations
from hcrepo.cache.keys import KeyMaker, Uncacheable
from hcrepo.cache.spec import Spec, Specs
from hcrepo.cache.store import REDIS_ERRORS, TOKEN_SIZE, RedisStore, new_token
from hcrepo.config import Settings, cache_key_bytes
from hcrepo.ops import metrics
from hcrepo.ops.breaker import CircuitBreaker
from hcrepo.phi.logs import logger
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.plan import Plan

_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_TOMBSTONE = b"L"  # + a fresh token: never TOKEN_SIZE long, so it matches no entry


Loaded = tuple[Any, int, str]
"""(value, position, served_by): the value reflects every commit a caller whose `need` is at
most `position` requires (see `Cache.fetch`); `served_by` is who answered it, as the access
log records it: the database node that read it, or SERVED_BY_CACHE."""
Load = Callable[[], Loaded]
"""A database read."""
SERVED_BY_CACHE = "cache"


class _Call(NamedTuple):
    spec: Spec
    key: str
    lock: str
    generations: list[str]
    need: int
    load: Load


class _Flight:
    """One in-process database read that concurrent misses of the same key share."""

    __slots__ = ("future", "superseded")

    def __init__(self) -> None:
        self.future: Future[Loaded] = Future()
        self.superseded = False


_MISSING: Any = object()  # "no usable value" (None is a value a query may return)
_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


class Cache:
    """Tenant-safe cache of read results, invalidated by tag after commit."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Cache | None:
        """None when REDIS_URL is empty or CACHE_ENABLED is false."""
        if not settings.redis_url or not settings.cache_enabled:
            return None
        return cls(settings)

    def __init__(self, settings: Settings) -> None:
        secret = settings.cache_encryption_key
        key = cache_key_bytes(secret.get_secret_value()) if secret is not None else None
        self._settings = settings
        self._cipher = AESGCM(key) if key is not None else None
        self._keys = KeyMaker(settings.cache_key_prefix, key)
        self._store = RedisStore(settings.redis_url, timeout=settings.cache_socket_timeout)
        self._breaker = CircuitBreaker(
            failures=settings.breaker_failures, reset=settings.breaker_reset
        )
        self._lock_ms = max(1, int(settings.cache_lock_timeout * 1000))
        self._beta = settings.cache_xfetch_beta
        self._tombstone_ms = (
            int((settings.max_lag_seconds + 2 * settings.health_interval) * 1000)
            if settings.read_replica_urls else 0
        )
        self._specs = Specs(settings, self._cipher)
        self._outage = False
        self._closed = threading.Event()
        self._invalidations = Invalidations(self._send_invalidations, self._redis_ok,
                                            self._closed)
        self._reset_process_state()
        _caches.add(self)

    def _reset_process_state(self) -> None:
        """Locks, threads and flights belong to one process (see the fork hook below)."""
        self._mutex = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._refreshing: set[str] = set()
        self._refresher: ThreadPoolExecutor | None = None
        self._invalidations.reset()

    # -- reads -----------------------------------------------------------------------------

    def fetch(
        self,
        plan: Plan,
        args: tuple[Any, ...],
        sql: str,
        context: Context,
        need: int,
        load: Load,
    ) -> tuple[Any, str]:
        """The plan's result for `args` in `context`, from Redis or from `load()`, and who
        answered it (SERVED_BY_CACHE or the load's node).

        `need`: the WAL position (an int LSN, 0 for none) the caller's reads must reflect;
        an entry whose recorded position is lower is not served to this caller.
        """
        spec = self._specs.get(plan, sql)
        if not isinstance(spec, Spec):
            spec.inc()  # the query's "not cached" counter
            return _answer(load())
        if self._invalidations.pending:
            return _answer(self._bypass(spec, "invalidation_pending", load))
        if not self._breaker.allow():
            return _answer(self._bypass(spec, "redis_unavailable", load))
        ns = self._keys.namespace(context.clinic_id, tenant_scoped=plan.tenant_scoped)
        try:
            entry = self._keys.entry(ns, spec.plan_id, context.clinic_id,
                                     [context.policy_value(name) for name in spec.keyed], args)
        except Uncacheable:
            return _answer(self._bypass(spec, "uncacheable_arguments", load))
        generations: list[str] = []
        if plan.cache is not None and plan.cache.tags:
            tag_key = self._keys.tag_key
            generations = [tag_key(ns, tag) for tag in plan.tags(plan.cache.tags, args)]
        call = _Call(spec, self._keys.value_key(ns, entry), self._keys.lock_key(ns, entry),
                     generations, need, load)
        try:
            raw, *current = self._store.read([call.key, *generations])
        except REDIS_ERRORS as exc:
            self._redis_failed(spec.query, exc)
            return _answer(self._bypass(spec, "redis_unavailable", load))
        self._redis_ok()
        if raw is not None:
            served = self._serve(call, raw, current, refresh=True)
            if served is not _MISSING:
                return _answer(served)
        return _answer(self._miss(call))

    def _serve(self, call: _Call, raw: bytes, current: list[bytes | None], *,
               refresh: bool) -> Any:
        """(value, position, SERVED_BY_CACHE) of the entry if its generations are current
        and it reflects the caller's writes (and a refresh if due); else _MISSING."""
        spec = call.spec
        try:
            entry = read_header(raw)
            if None in current or entry.tokens != b"".join(current):  # type: ignore[arg-type]
                return _MISSING  # invalidated since it was read: never served, not even stale
            if entry.position < call.need:
                return _MISSING  # filled before the caller's last write was visible
            value = spec.codec.decode(raw, entry, key=call.key)
        except Unreadable:
            metrics.CACHE_ERRORS.labels(query=spec.query, kind="unreadable").inc()
            return _MISSING
        spec.counters.bytes_read.inc(len(raw))
        now_ms = time.time() * 1000
        due = entry.soft_expiry_ms
        if now_ms >= due:
            spec.counters.stale.inc()
        else:
            spec.counters.hits.inc()
            if self._beta <= 0 or now_ms - entry.load_us / 1000 * self._beta * math.log(
                1.0 - random.random()
            ) < due:
                return value, entry.position, SERVED_BY_CACHE
        if refresh:
            self._refresh(call)
        return value, entry.position, SERVED_BY_CACHE

    def _miss(self, call: _Call) -> Loaded:
        with self._mutex:
            flight = self._flights.get(call.key)
            leader = flight is None or flight.superseded
            if leader:
                flight = self._flights[call.key] = _Flight()
        assert flight is not None
        if not leader:
            metrics.CACHE_COALESCED.labels(query=call.spec.query, via="process").inc()
            try:
                loaded = flight.future.result(timeout=self._lock_ms / 1000)
            except TimeoutError:
                return self._bypass(call.spec, "lock_wait_timeout", call.load)
            if loaded[1] >= call.need:
                return loaded
            return self._fill(call)  # the leader may have read before this caller's write
        try:
            loaded = self._fill(call)
        except BaseException as exc:
            flight.future.set_exception(exc)
            raise
        else:
            flight.future.set_result(loaded)
            return loaded
        finally:
            with self._mutex:
                if self._flights.get(call.key) is flight:
                    del self._flights[call.key]

    def _fill(self, call: _Call) -> Loaded:
        """Read the database under the key's lock, or wait for whoever holds it."""
        spec = call.spec
        deadline = 0.0
        lock_held = False
        while True:
            try:
                if not lock_held:
                    begun = self._begin(call)
                    if begun is None:
                        return self._bypass(spec, "replica_lag_window", call.load)
                    taken, tokens, lock_token = begun
                    if taken:
                        break
                if not deadline:
                    deadline = time.monotonic() + self._lock_ms / 1000
                    metrics.CACHE_COALESCED.labels(query=spec.query, via="redis").inc()
                served, lock_held = self._await_fill(call, deadline)
            except REDIS_ERRORS as exc:
                self._redis_failed(spec.query, exc)
                return self._bypass(spec, "redis_unavailable", call.load)
            if served is not _MISSING:
                return served  # type: ignore[no-any-return]
            if lock_held:  # still held at the deadline: stop waiting
                return self._bypass(spec, "lock_wait_timeout", call.load)
        spec.counters.misses.inc()
        return self._load_and_store(call, tokens, lock_token)

    def _begin(self, call: _Call) -> tuple[bool, list[bytes], bytes] | None:
        """Try the key's fill lock: (taken, the generations' tokens, lock token), or None
        while a tag is in its replica-lag window (a tombstone, not a token), when nothing
        read now may be stored; a lock taken then is released at once."""
        lock_token = new_token()
        taken, tokens = self._store.begin(
            call.lock, call.generations, lock_token, self._lock_ms, call.spec.ttl_ms
        )
        if any(len(token) != TOKEN_SIZE for token in tokens):
            if taken:
                self._store.release(call.lock, lock_token)
            return None
        return taken, tokens, lock_token

    def _await_fill(self, call: _Call, deadline: float) -> tuple[Any, bool]:
        """Poll until the lock holder's value lands (Loaded, _) or the lock is free
        (_, False); (_MISSING, True) when the deadline passed first."""
        pause = _POLL_FIRST
        while not self._closed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, _POLL_MAX)
            raw, holder, *current = self._store.read([call.key, call.lock, *call.generations])
            if raw is not None:
                served = self._serve(call, raw, current, refresh=False)
                if served is not _MISSING:
                    return served, False
            if holder is None:
                return _MISSING, False
        return _MISSING, True

    def _load_and_store(
        self, call: _Call, tokens: list[bytes], lock_token: bytes
    ) -> Loaded:
        spec = call.spec
        started = time.perf_counter()
        try:
            value, position, served_by = call.load()
        except BaseException:
            self._quietly(spec.query, self._store.release, call.lock, lock_token)
            raise
        load_us = int((time.perf_counter() - started) * 1_000_000)
        try:
            entry = spec.codec.encode(
                value, key=call.key, soft_expiry_ms=int(time.time() * 1000) + spec.soft_ms,
                load_us=load_us, position=position, tokens=b"".join(tokens),
            )
        except Exception:  # a value its declared type cannot serialize: do not cache it
            metrics.CACHE_ERRORS.labels(query=spec.query, kind="encode").inc()
            self._quietly(spec.query, self._store.release, call.lock, lock_token)
            return value, position, served_by
        stored = self._quietly(spec.query, self._store.store, call.key, call.lock,
                               call.generations, tokens, entry, spec.ttl_ms, lock_token)
        if stored:
            spec.counters.bytes_written.inc(len(entry))
        return value, position, served_by

    def _refresh(self, call: _Call) -> None:
        """Start the one background refresh of a stale value, unless one is running."""
        with self._mutex:
            if call.key in self._refreshing:
                return
            self._refreshing.add(call.key)
        try:
            begun = self._begin(call)
        except REDIS_ERRORS as exc:
            self._redis_failed(call.spec.query, exc)
            begun = None
        if begun is None or not begun[0]:
            with self._mutex:
                self._refreshing.discard(call.key)
            return
        _, tokens, lock_token = begun
        with self._mutex:
            if self._refresher is None:
                self._refresher = ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="hcrepo-cache-refresh"
                )
            refresher = self._refresher
        try:
            # `call.load` carries the caller's context and read-your-writes position.
            refresher.submit(self._refresh_job, call, tokens, lock_token)
        except RuntimeError:  # closing: leave the stale value to its TTL
            self._quietly(call.spec.query, self._store.release, call.lock, lock_token)
            with self._mutex:
                self._refreshing.discard(call.key)
            return
        call.spec.counters.refreshes.inc()

    def _refresh_job(self, call: _Call, tokens: list[bytes], lock_token: bytes) -> None:
        try:
            self._load_and_store(call, tokens, lock_token)
        except Exception as exc:
            metrics.CACHE_ERRORS.labels(query=call.spec.query, kind="refresh").inc()
            logger.warning("cache refresh of {} failed ({}); the stale value expires with its "
                           "TTL", call.spec.query, type(exc).__name__)
        finally:
            with self._mutex:
                self._refreshing.discard(call.key)

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self, context: Context, tags: Sequence[str]) -> None:
        """Called after COMMIT succeeded, never after a rollback. Never raises."""
        if not tags:
            return
        groups: Groups = {}
        for ns in self._keys.namespaces_for_invalidation(context.clinic_id):
            groups[ns.tags] = {self._keys.tag_key(ns, tag) for tag in tags}
        with self._mutex:
            # A miss already in flight read before this commit: later callers must not join it.
            for flight in self._flights.values():
                flight.superseded = True
        if not self._invalidations.pending and self._breaker.allow():
            try:
                self._send_invalidations(groups)
                self._redis_ok()
                return
            except REDIS_ERRORS as exc:
                self._redis_failed(None, exc)
        self._invalidations.queue(groups)

    def _send_invalidations(self, groups: Groups) -> None:
        tombstone = _TOMBSTONE + new_token() if self._tombstone_ms else None
        listed = [sorted(keys) for keys in groups.values() if keys is not None]
        if listed:
            self._store.invalidate(listed, tombstone, self._tombstone_ms)
        for tags_prefix, keys in groups.items():
            if keys is None:
                self._store.invalidate_namespace(tags_prefix, tombstone, self._tombstone_ms)

    # -- health ----------------------------------------------------------------------------

    def _redis_ok(self) -> None:
        if self._breaker.success():
            self._outage = False
            metrics.CACHE_BREAKERS_OPEN.dec()
            logger.info("Redis cache reachable again; caching resumes")

    def _redis_failed(self, query: str | None, exc: Exception) -> None:
        metrics.CACHE_ERRORS.labels(query=query or "-", kind="redis").inc()
        if self._breaker.failure() and not self._outage:
            self._outage = True
            metrics.CACHE_BREAKERS_OPEN.inc()
            logger.warning("Redis cache unavailable ({}); reads go to the database until it "
                           "recovers", type(exc).__name__)

    def _quietly(self, query: str, operation: Callable[..., Any], *args: Any) -> Any:
        """Best effort Redis write after a database read: failures are counted, not raised."""
        try:
            result = operation(*args)
        except REDIS_ERRORS as exc:
            self._redis_failed(query, exc)
            return None
        self._redis_ok()
        return result

    # -- plans -----------------------------------------------------------------------------

    @staticmethod
    def _bypass(spec: Spec, reason: str, load: Load) -> Loaded:
        metrics.CACHE_BYPASSED.labels(query=spec.query, reason=reason).inc()
        return load()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Deliver queued invalidations if Redis answers, then release Redis connections."""
        self._closed.set()
        refresher = self._refresher
        self._invalidations.close()
        if refresher is not None:
            refresher.shutdown(wait=True, cancel_futures=True)
        self._store.close()


def _answer(loaded: Loaded) -> tuple[Any, str]:
    return loaded[0], loaded[2]


def _after_fork_in_child() -> None:
    for cache in list(_caches):
        cache._store.forget_connections()
        cache._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)
