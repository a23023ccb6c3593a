"""Cache invalidations that could not reach Redis: queued, and retried by one background
thread until they land.

While anything is queued, the process reads past the cache (the caller checks `pending`), so
it never serves a value it failed to invalidate; other processes may serve it for at most its
TTL, which is its Redis expiry. Memory is bounded: past `MAX_PENDING` queued tags, whole
namespaces (clinics) are queued instead, and retired at once when Redis answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hcrepo.cache.store import REDIS_ERRORS
from hcrepo.ops import metrics
from hcrepo.phi.logs import logger

# Generation keys to retire, by namespace (its tags prefix); None: every one of them.
Groups = dict[str, set[str] | None]

MAX_PENDING = 10_000
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0


class Invalidations:
    """The queue of one cache; `send` delivers groups to Redis (raising a Redis error when it
    cannot), `delivered` is told each time a retry got through."""

    def __init__(
        self, send: Callable[[Groups], None], delivered: Callable[[], None],
        closed: threading.Event,
    ) -> None:
        self._send = send
        self._delivered = delivered
        self._closed = closed
        self.reset()

    def reset(self) -> None:
        """Start empty: also in a forked child, which has neither the parent's lock nor its
        retrying thread."""
        self._lock = threading.Lock()
        self._pending: Groups = {}
        self._count = 0
        self._retrier: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def queue(self, groups: Groups) -> None:
        metrics.CACHE_INVALIDATION_FAILURES.inc()
        with self._lock:
            first = not self._pending
            for tags_prefix, keys in groups.items():
                held = self._pending.setdefault(tags_prefix, set())
                if held is not None and keys is not None:
                    held.update(keys)
            if self._queued() > MAX_PENDING:
                self._pending = dict.fromkeys(self._pending)
            self._update_gauge()
            if self._retrier is None:
                self._retrier = threading.Thread(
                    target=self._retry, name="hcrepo-cache-invalidate", daemon=True
                )
                self._retrier.start()
        if first:
            logger.warning("cache invalidation could not reach Redis; retrying in the "
                           "background, this process reads past the cache until it lands")

    def close(self) -> None:
        """Stop retrying (the cache has set `closed`) and make one last delivery attempt."""
        retrier = self._retrier
        if retrier is not None:
            retrier.join(timeout=5)
        with self._lock:
            batch, self._pending = self._pending, {}
            self._update_gauge()
        if not batch:
            return
        try:
            self._send(batch)
        except REDIS_ERRORS:
            logger.warning("{} queued cache invalidations could not be delivered before "
                           "close; the values they cover expire with their TTL", len(batch))

    def _retry(self) -> None:
        delay = _RETRY_FIRST
        while True:
            with self._lock:
                batch = {prefix: None if keys is None else set(keys)
                         for prefix, keys in self._pending.items()}
                if not batch or self._closed.is_set():
                    self._retrier = None
                    return
            if self._closed.wait(delay):
                continue
            try:
                self._send(batch)
            except REDIS_ERRORS:
                delay = min(delay * 2, _RETRY_MAX)
                continue
            delay = _RETRY_FIRST
            done = self._delivered_batch(batch)
            self._delivered()
            if done:
                logger.info("queued cache invalidations delivered; caching resumes")

    def _delivered_batch(self, batch: Groups) -> bool:
        """Drop what `batch` delivered, keeping what was queued while it ran; True when
        nothing is left."""
        with self._lock:
            for prefix, sent in batch.items():
                held = self._pending.get(prefix)
                if held is not None and sent is not None and held - sent:
                    self._pending[prefix] = held - sent
                elif held is not None or sent is None:
                    self._pending.pop(prefix, None)
            self._update_gauge()
            return not self._pending

    def _queued(self) -> int:
        return sum(1 if keys is None else len(keys) for keys in self._pending.values())

    def _update_gauge(self) -> None:
        count = self._queued()
        metrics.CACHE_PENDING_INVALIDATIONS.inc(count - self._count)
        self._count = count
