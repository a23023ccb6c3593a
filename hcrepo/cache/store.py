"""The cache's Redis protocol: one MGET per read, one script per fill step, plain or Cluster.

Generations: every tag has a key holding a random 8-byte token. A
value is stored with the tokens that were current before its database read began, and is
valid only while all of them still are. Invalidation deletes the tokens (after a commit on
a server with replicas it writes a longer tombstone instead, see `Cache.invalidate`); the
next fill creates fresh ones. A reader that read the database before a commit therefore holds
tokens that no longer exist once the commit's invalidation ran: its store is refused, and even
a value that got in would not match. Random tokens, not counters, so a token key that expires
or is evicted can never come back with a value an old entry holds.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

CLUSTER_SCHEME = "redis+cluster://"
TOKEN_SIZE = 8  # bytes of a generation token, a lock token, an entry's copy of its tokens
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

# KEYS: lock, generations...   ARGV: lock token, lock ms, value ms, token size, fresh tokens...
# Takes the fill lock if free and returns {taken, current token of each generation}, creating
# missing ones. Live tokens are kept at least as long as the value about to be stored;
# tombstones (not token-sized) keep their own, shorter life.
_BEGIN = """
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local out = {taken and 1 or 0}
local size = tonumber(ARGV[4])
for i = 2, #KEYS do
  local token = redis.call('GET', KEYS[i])
  if not token then
    token = ARGV[i + 3]
    redis.call('SET', KEYS[i], token, 'PX', ARGV[3])
  elseif #token == size then
    redis.call('PEXPIRE', KEYS[i], ARGV[3], 'GT')
  end
  out[i] = token
end
return out
"""

# KEYS: value, lock, generations...   ARGV: entry, value ms, lock token, tokens...
# Stores the entry only if every generation still holds the token the read began under;
# releases the lock if it is still ours. Returns 1 when stored.
_STORE = """
local stored = 1
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[i + 1] then
    stored = 0
    break
  end
end
if stored == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return stored
"""

# KEYS: lock   ARGV: lock token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_token() -> bytes:
    return os.urandom(TOKEN_SIZE)


class RedisStore:
    """A redis-py client (Redis or RedisCluster) with short timeouts and no retries of its
    own: failures go straight to the cache's circuit breaker."""

    def __init__(self, url: str, *, timeout: float) -> None:
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        self.client: redis.Redis | RedisCluster
        self._pool: redis.ConnectionPool | None = None
        self._idle: deque[Any] = deque()  # read connections (single server only)
        if url.startswith(CLUSTER_SCHEME):
            self.client = RedisCluster.from_url(
                "redis://" + url.removeprefix(CLUSTER_SCHEME), **options
            )
        else:
            self.client = redis.Redis.from_url(url, **options)
            self._pool = self.client.connection_pool
        self._begin = self.client.register_script(_BEGIN)
        self._store = self.client.register_script(_STORE)
        self._release = self.client.register_script(_RELEASE)

    def read(self, keys: list[str]) -> list[bytes | None]:
        """One MGET of keys that share a hash tag: the whole cost of a cache hit.

        On a single server it runs on connections of its own, kept in a LIFO deque (append
        and pop are atomic): redis-py 8's execute_command and pool checkout add retry
        closures, observability hooks and a poll() per call, together worth a quarter of a
        loopback GET, and nothing here is retried anyway (failures go to the breaker). A
        connection that failed mid-reply is dropped, never reused.
        """
        pool = self._pool
        if pool is None:
            return cast(list[bytes | None], self.client.mget(keys))
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = pool.connection_class(**pool.connection_kwargs)
        try:
            conn.send_command("MGET", *keys)
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        self._idle.append(conn)
        return cast(list[bytes | None], reply)

    def forget_connections(self) -> None:
        """After a fork: the parent's sockets are not ours to use (nor to close)."""
        self._idle.clear()

    def begin(
        self, lock: str, generations: list[str], lock_token: bytes, lock_ms: int, value_ms: int
    ) -> tuple[bool, list[bytes]]:
        fresh = [new_token() for _ in generations]
        reply = self._begin(
            keys=[lock, *generations],
            args=[lock_token, lock_ms, value_ms, TOKEN_SIZE, *fresh],
        )
        return bool(reply[0]), [bytes(token) for token in reply[1:]]

    def store(
        self,
        value_key: str,
        lock: str,
        generations: list[str],
        tokens: list[bytes],
        entry: bytes,
        value_ms: int,
        lock_token: bytes,
    ) -> bool:
        return bool(self._store(
            keys=[value_key, lock, *generations],
            args=[entry, value_ms, lock_token, *tokens],
        ))

    def release(self, lock: str, lock_token: bytes) -> None:
        self._release(keys=[lock], args=[lock_token])

    def invalidate(
        self, groups: list[list[str]], tombstone: bytes | None, tombstone_ms: int
    ) -> None:
        """Delete (or tombstone) generation keys; each group shares one hash tag."""
        pipe = self.client.pipeline(transaction=False)
        for keys in groups:
            if tombstone is None:
                pipe.execute_command("DEL", *keys)  # ClusterPipeline.delete takes one key
            else:
                for key in keys:
                    pipe.set(key, tombstone, px=tombstone_ms)
        pipe.execute()

    def invalidate_namespace(
        self, tags_prefix: str, tombstone: bytes | None, tombstone_ms: int
    ) -> None:
        """Every generation key of one namespace (SCAN: the rare, bounded-memory path).

        A fill that began before the commits being caught up on took its tokens then, so
        SCAN (which returns every key present from start to end) finds and retires them.
        """
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in tags_prefix) + "*"
        batch: list[str] = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) == 500:
                self.invalidate([batch], tombstone, tombstone_ms)
                batch = []
        if batch:
            self.invalidate([batch], tombstone, tombstone_ms)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().disconnect()
        self.client.close()
