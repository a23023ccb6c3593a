"""Redis cache for repository reads: tenant-safe, invalidated after commit, never in the way.

A read (`fetch`) costs one MGET: the value and the generation tokens of its tags (see
hcrepo.cache_store). A valid value before its soft TTL is a hit; past it, the stale
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

Who asks is part of the key: every policy input the database sees (`tenancy.POLICY_INPUTS`,
the actor besides the clinic) is hashed into it, unless the query declares
`@cached(independent_of=...)`; hcrepo refuses that declaration for SQL that reads the setting,
and `hcrepo check` reports it for tables whose row-level security policies do.

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
from loguru import logger
from prometheus_client import Counter

from hcrepo.cache_codec import (
    CODEC_VERSION,
    TOKEN_SIZE,
    Unreadable,
    ValueCodec,
    read_header,
    value_type,
)
from hcrepo.cache_keys import KeyMaker, Uncacheable, plan_id
from hcrepo.cache_store import REDIS_ERRORS, RedisStore, new_token
from hcrepo.config import Settings, cache_key_bytes
from hcrepo.errors import ConfigError
from hcrepo.ops import metrics
from hcrepo.ops.breaker import CircuitBreaker
from hcrepo.tenancy import POLICY_INPUTS, Context

if TYPE_CHECKING:
    from hcrepo.repository import Plan

# Past this many queued tag invalidations, whole namespaces (clinics) are queued instead.
_MAX_PENDING = 10_000
_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0
_TOMBSTONE = b"L"  # + a fresh token: never TOKEN_SIZE long, so it matches no entry


class _Counters(NamedTuple):
    """A query's metric children, bound once (label lookup is the slow part)."""

    hits: Counter
    misses: Counter
    stale: Counter
    refreshes: Counter
    bytes_read: Counter
    bytes_written: Counter

    @classmethod
    def bind(cls, query: str) -> _Counters:
        return cls(
            metrics.CACHE_HITS.labels(query=query),
            metrics.CACHE_MISSES.labels(query=query),
            metrics.CACHE_STALE.labels(query=query),
            metrics.CACHE_REFRESHES.labels(query=query),
            metrics.CACHE_BYTES.labels(query=query, direction="read"),
            metrics.CACHE_BYTES.labels(query=query, direction="written"),
        )


class _Spec(NamedTuple):
    """What one (plan, SQL text) needs at every call, worked out on its first call."""

    query: str
    plan_id: str
    keyed: tuple[str, ...]  # the Context fields besides the clinic its entries are keyed by
    codec: ValueCodec
    ttl_ms: int
    soft_ms: int
    counters: _Counters


Load = Callable[[], tuple[Any, int]]
"""A database read returning (value, position): the value reflects every commit a caller
whose `need` is at most `position` requires (see `Cache.fetch`)."""


class _Call(NamedTuple):
    spec: _Spec
    key: str
    lock: str
    generations: list[str]
    need: int
    load: Load


class _Flight:
    """One in-process database read that concurrent misses of the same key share."""

    __slots__ = ("future", "superseded")

    def __init__(self) -> None:
        self.future: Future[tuple[Any, int]] = Future()
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
        self._specs: dict[tuple[Plan, str], _Spec | Counter] = {}
        self._warned: set[str] = set()
        self._outage = False
        self._closed = threading.Event()
        self._reset_process_state()
        _caches.add(self)

    def _reset_process_state(self) -> None:
        """Locks, threads and flights belong to one process (see the fork hook below)."""
        self._mutex = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._refreshing: set[str] = set()
        # Generation keys to retire, by namespace (its tags prefix); None = all of them.
        self._pending: dict[str, set[str] | None] = {}
        self._pending_count = 0
        self._retrier: threading.Thread | None = None
        self._refresher: ThreadPoolExecutor | None = None

    # -- reads -----------------------------------------------------------------------------

    def fetch(
        self,
        plan: Plan,
        args: tuple[Any, ...],
        sql: str,
        context: Context,
        need: int,
        load: Load,
    ) -> Any:
        """The plan's result for `args` in `context`, from Redis or from `load()`.

        `need`: the WAL position (an int LSN, 0 for none) the caller's reads must reflect;
        an entry whose recorded position is lower is not served to this caller.
        """
        spec = self._specs.get((plan, sql)) or self._spec(plan, sql)
        if not isinstance(spec, _Spec):
            spec.inc()  # the query's "not cached" counter
            return load()[0]
        if self._pending:
            return self._bypass(spec, "invalidation_pending", load)[0]
        if not self._breaker.allow():
            return self._bypass(spec, "redis_unavailable", load)[0]
        ns = self._keys.namespace(context.clinic_id, tenant_scoped=plan.tenant_scoped)
        try:
            entry = self._keys.entry(ns, spec.plan_id, context.clinic_id,
                                     [getattr(context, name) for name in spec.keyed], args)
        except Uncacheable:
            return self._bypass(spec, "uncacheable_arguments", load)[0]
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
            return self._bypass(spec, "redis_unavailable", load)[0]
        self._redis_ok()
        if raw is not None:
            served = self._serve(call, raw, current, refresh=True)
            if served is not _MISSING:
                return served[0]
        return self._miss(call)[0]

    def _serve(self, call: _Call, raw: bytes, current: list[bytes | None], *,
               refresh: bool) -> Any:
        """(value, position) of the entry if its generations are current and it reflects
        the caller's writes (and a refresh if due); else _MISSING."""
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
                return value, entry.position
        if refresh:
            self._refresh(call)
        return value, entry.position

    def _miss(self, call: _Call) -> tuple[Any, int]:
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

    def _fill(self, call: _Call) -> tuple[Any, int]:
        """Read the database under the key's lock, or wait for whoever holds it."""
        spec = call.spec
        deadline = 0.0
        lock_held = False
        while True:
            try:
                if not lock_held:
                    lock_token = new_token()
                    taken, tokens = self._store.begin(
                        call.lock, call.generations, lock_token, self._lock_ms, spec.ttl_ms
                    )
                    if any(len(token) != TOKEN_SIZE for token in tokens):
                        if taken:
                            self._store.release(call.lock, lock_token)
                        return self._bypass(spec, "replica_lag_window", call.load)
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

    def _await_fill(self, call: _Call, deadline: float) -> tuple[Any, bool]:
        """Poll until the lock holder's value lands ((value, position), _) or the lock is free
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
    ) -> tuple[Any, int]:
        spec = call.spec
        started = time.perf_counter()
        try:
            value, position = call.load()
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
            return value, position
        stored = self._quietly(spec.query, self._store.store, call.key, call.lock,
                               call.generations, tokens, entry, spec.ttl_ms, lock_token)
        if stored:
            spec.counters.bytes_written.inc(len(entry))
        return value, position

    def _refresh(self, call: _Call) -> None:
        """Start the one background refresh of a stale value, unless one is running."""
        with self._mutex:
            if call.key in self._refreshing:
                return
            self._refreshing.add(call.key)
        try:
            lock_token = new_token()
            taken, tokens = self._store.begin(
                call.lock, call.generations, lock_token, self._lock_ms, call.spec.ttl_ms
            )
            if taken and any(len(token) != TOKEN_SIZE for token in tokens):
                self._store.release(call.lock, lock_token)
                taken = False
        except REDIS_ERRORS as exc:
            self._redis_failed(call.spec.query, exc)
            taken = False
        if not taken:
            with self._mutex:
                self._refreshing.discard(call.key)
            return
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
        groups: dict[str, set[str] | None] = {}
        for ns in self._keys.namespaces_for_invalidation(context.clinic_id):
            groups[ns.tags] = {self._keys.tag_key(ns, tag) for tag in tags}
        with self._mutex:
            # A miss already in flight read before this commit: later callers must not join it.
            for flight in self._flights.values():
                flight.superseded = True
            queued = bool(self._pending)
        if not queued and self._breaker.allow():
            try:
                self._send_invalidations(groups)
                self._redis_ok()
                return
            except REDIS_ERRORS as exc:
                self._redis_failed(None, exc)
        self._queue(groups)

    def _send_invalidations(self, groups: dict[str, set[str] | None]) -> None:
        tombstone = _TOMBSTONE + new_token() if self._tombstone_ms else None
        listed = [sorted(keys) for keys in groups.values() if keys is not None]
        if listed:
            self._store.invalidate(listed, tombstone, self._tombstone_ms)
        for tags_prefix, keys in groups.items():
            if keys is None:
                self._store.invalidate_namespace(tags_prefix, tombstone, self._tombstone_ms)

    def _queue(self, groups: dict[str, set[str] | None]) -> None:
        metrics.CACHE_INVALIDATION_FAILURES.inc()
        with self._mutex:
            first = not self._pending
            for tags_prefix, keys in groups.items():
                if tags_prefix not in self._pending:
                    self._pending[tags_prefix] = set()
                held = self._pending[tags_prefix]
                if held is not None and keys is not None:
                    held.update(keys)
            if self._count_pending() > _MAX_PENDING:
                # Bounded memory: retire every generation of the namespaces concerned.
                self._pending = dict.fromkeys(self._pending)
            self._update_pending_gauge()
            if self._retrier is None:
                self._retrier = threading.Thread(
                    target=self._retry_pending, name="hcrepo-cache-invalidate", daemon=True
                )
                self._retrier.start()
        if first:
            logger.warning("cache invalidation could not reach Redis; retrying in the "
                           "background, this process reads past the cache until it lands")

    def _retry_pending(self) -> None:
        delay = _RETRY_FIRST
        while True:
            with self._mutex:
                batch = {prefix: None if keys is None else set(keys)
                         for prefix, keys in self._pending.items()}
                if not batch or self._closed.is_set():
                    self._retrier = None
                    return
            if self._closed.wait(delay):
                continue
            try:
                self._send_invalidations(batch)
            except REDIS_ERRORS:
                delay = min(delay * 2, _RETRY_MAX)
                continue
            delay = _RETRY_FIRST
            with self._mutex:
                for prefix, sent in batch.items():
                    held = self._pending.get(prefix)
                    if held is not None and sent is not None and held - sent:
                        self._pending[prefix] = held - sent  # queued while this batch ran
                    elif held is not None or sent is None:
                        self._pending.pop(prefix, None)
                self._update_pending_gauge()
                done = not self._pending
            self._redis_ok()
            if done:
                logger.info("queued cache invalidations delivered; caching resumes")

    def _count_pending(self) -> int:
        return sum(1 if keys is None else len(keys) for keys in self._pending.values())

    def _update_pending_gauge(self) -> None:
        count = self._count_pending()
        metrics.CACHE_PENDING_INVALIDATIONS.inc(count - self._pending_count)
        self._pending_count = count

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

    def _spec(self, plan: Plan, sql: str) -> _Spec | Counter:
        """The plan's spec, or the bypass counter to bump when it must not be cached."""
        spec: _Spec | Counter
        annotation = value_type(plan.shape)
        if plan.phi and self._cipher is None:
            self._warn_once(plan.name, "is phi=True and HCREPO_CACHE_ENCRYPTION_KEY is not "
                                       "set: its results are not cached")
            spec = metrics.CACHE_BYPASSED.labels(query=plan.name, reason="phi_without_key")
        elif annotation is None:
            self._warn_once(plan.name, "returns a shape that cannot be cached")
            spec = metrics.CACHE_BYPASSED.labels(query=plan.name, reason="uncacheable_shape")
        else:
            assert plan.cache is not None
            ttl = self._ttl_seconds(plan.cache.ttl, plan.name)
            codec = ValueCodec(annotation, self._cipher if plan.phi else None)
            # The clinic is keyed by the namespace (and, outside it, by the value key).
            keyed = tuple(name for name in POLICY_INPUTS
                          if name != "clinic_id" and name not in plan.cache.independent_of)
            spec = _Spec(
                query=plan.name,
                plan_id=plan_id(plan.name, sql,
                                [codec.schema, codec.encrypts, plan.cache.tags, keyed],
                                CODEC_VERSION),
                keyed=keyed,
                codec=codec,
                ttl_ms=int(ttl * 1000),
                soft_ms=int(ttl * 1000 * self._settings.cache_soft_ttl_ratio),
                counters=_Counters.bind(plan.name),
            )
        self._specs[(plan, sql)] = spec
        return spec

    def _ttl_seconds(self, ttl: int | str, query: str) -> float:
        """Seconds, a preset of HCREPO_CACHE_TTL_PRESETS, or "default" (CACHE_TTL)."""
        if isinstance(ttl, str):
            presets = {"default": self._settings.cache_ttl, **self._settings.cache_ttl_presets}
            if ttl not in presets:
                raise ConfigError("HCREPO_CACHE_TTL_PRESETS",
                                  f"has no preset {ttl!r} (used by {query})")
            return presets[ttl]
        if ttl <= 0:
            raise ConfigError("CACHE_TTL", f"@cached(ttl={ttl}) of {query} must be positive")
        return ttl

    def _warn_once(self, query: str, problem: str) -> None:
        if query not in self._warned:
            self._warned.add(query)
            logger.warning("cached query {} {}", query, problem)

    @staticmethod
    def _bypass(spec: _Spec, reason: str, load: Load) -> tuple[Any, int]:
        metrics.CACHE_BYPASSED.labels(query=spec.query, reason=reason).inc()
        return load()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Deliver queued invalidations if Redis answers, then release Redis connections."""
        self._closed.set()
        retrier, refresher = self._retrier, self._refresher
        if retrier is not None:
            retrier.join(timeout=5)
        if refresher is not None:
            refresher.shutdown(wait=True, cancel_futures=True)
        with self._mutex:
            batch, self._pending = self._pending, {}
            self._update_pending_gauge()
        if batch:
            try:
                self._send_invalidations(batch)
            except REDIS_ERRORS:
                logger.warning("{} queued cache invalidations could not be delivered before "
                               "close; the values they cover expire with their TTL",
                               len(batch))
        self._store.close()


def _after_fork_in_child() -> None:
    for cache in list(_caches):
        cache._store.forget_connections()
        cache._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)
