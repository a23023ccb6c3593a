"""Redis key names of the cache: the clinic in every key, arguments and tags only as hashes.

    <prefix>:{c:<clinic>}:v:<query>:<plan id>:<args hash>     a cached value
    <prefix>:{c:<clinic>}:l:<query>:<plan id>:<args hash>     its fill lock
    <prefix>:{c:<clinic>}:t:<tag hash>                        a tag's generation token
    <prefix>:{g}:v:<query>:<plan id>:<clinic>:<args hash>     a non-tenant plan's value

The args hash covers, before the arguments, the value of every policy input
(`tenancy.POLICY_INPUTS`, the actor for one) that the query does not declare itself
independent of: what row-level security may shape a result by is in its key. The clinic is
in the namespace instead.

The braces are a Redis Cluster hash tag: a value, its lock and every generation it depends on
share one slot, so one MGET or one script reads or changes them together. Plans of
`Repository(tenant=False)` live in the `{g}` namespace and still carry the context's clinic in
the value key, so a result that row-level security shaped is never shared across clinics.

The plan id hashes the SQL text, the result type's JSON schema, whether values are encrypted,
the tag templates, the policy inputs it is keyed by and the codec version: editing the SQL,
the model, the tags or `independent_of`, or marking a query phi=True, makes old entries
unreachable. Argument and tag hashes are keyed BLAKE2b
(the key is derived from HCREPO_CACHE_ENCRYPTION_KEY when one is set), so a name in Redis can
neither be read back nor confirmed by hashing guesses (a date of birth, an SSN).
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any
from uuid import UUID

GLOBAL = "g"
_NO_CLINIC = "-"


class Uncacheable(TypeError):
    """An argument whose type has no canonical encoding: the read skips the cache."""


class Namespace:
    """The keys of one clinic (or of the non-tenant namespace), sharing one hash tag."""

    __slots__ = ("prefix", "tags")

    def __init__(self, prefix: str, segment: str) -> None:
        self.prefix = f"{prefix}:{{{segment}}}"
        self.tags = f"{self.prefix}:t:"  # every generation key of the namespace starts so


class KeyMaker:
    def __init__(self, prefix: str, secret: bytes | None) -> None:
        self._prefix = prefix
        # An empty key means plain (unkeyed) BLAKE2b: still one-way, but guessable.
        self._secret = b"" if secret is None else hashlib.blake2b(
            secret, digest_size=32, person=b"hcrepo-keys"
        ).digest()
        self._global = Namespace(prefix, GLOBAL)
        self._clinics: dict[UUID, Namespace] = {}

    def namespace(self, clinic_id: UUID | None, *, tenant_scoped: bool = True) -> Namespace:
        if not tenant_scoped or clinic_id is None:
            return self._global
        found = self._clinics.get(clinic_id)
        if found is None:
            found = self._clinics[clinic_id] = Namespace(self._prefix, f"c:{clinic_id.hex}")
        return found

    def namespaces_for_invalidation(self, clinic_id: UUID | None) -> list[Namespace]:
        """A write invalidates its tags in its clinic and among the non-tenant values."""
        if clinic_id is None:
            return [self._global]
        return [self.namespace(clinic_id), self._global]

    def entry(
        self,
        ns: Namespace,
        plan_id: str,
        clinic_id: UUID | None,
        policy: Sequence[Any],
        args: Sequence[Any],
    ) -> str:
        """`<ns>:<plan id>:<args hash>`; value and lock keys insert `v` / `l` after ns.

        `policy`: the values of the policy inputs the plan is keyed by (a plan id fixes how
        many, and every encoding is self-delimiting, so they never run into the arguments)."""
        digest = hashlib.blake2b(digest_size=16, key=self._secret, person=b"hcrepo-args")
        for value in policy:
            _encode(value, digest.update)
        for value in args:
            _encode(value, digest.update)
        if ns is self._global:
            clinic = _NO_CLINIC if clinic_id is None else clinic_id.hex
            return f"{plan_id}:{clinic}:{digest.hexdigest()}"
        return f"{plan_id}:{digest.hexdigest()}"

    @staticmethod
    def value_key(ns: Namespace, entry: str) -> str:
        return f"{ns.prefix}:v:{entry}"

    @staticmethod
    def lock_key(ns: Namespace, entry: str) -> str:
        return f"{ns.prefix}:l:{entry}"

    def tag_key(self, ns: Namespace, tag: str) -> str:
        digest = hashlib.blake2b(
            tag.encode(), digest_size=12, key=self._secret, person=b"hcrepo-tags"
        )
        return f"{ns.tags}{digest.hexdigest()}"


def plan_id(query_name: str, sql: str, value_format: object, codec_version: int) -> str:
    """`<query>:<hash>`: the query name for operators, the hash for the SQL text and the
    value's format (its type's JSON schema, whether it is encrypted, the tags it carries)."""
    identity = json.dumps([codec_version, sql, value_format], sort_keys=True, default=repr)
    return f"{query_name}:{hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()}"


# --- canonical argument encoding --------------------------------------------------------
# Type-tagged and length-prefixed, so distinct argument tuples never encode alike
# ("ab", "c" vs "a", "bc"; 1 vs "1" vs True).

Feed = Callable[[bytes], None]


def _text(tag: bytes, text: str, feed: Feed) -> None:
    data = text.encode()
    feed(tag + len(data).to_bytes(4, "big") + data)


def _encode(value: Any, feed: Feed) -> None:
    encoder = _ENCODERS.get(type(value))
    if encoder is not None:
        encoder(value, feed)
        return
    if isinstance(value, Enum):
        _text(b"e", f"{type(value).__module__}.{type(value).__qualname__}", feed)
        _encode(value.value, feed)
        return
    for base, base_encoder in _ENCODERS.items():
        if base is not type(None) and isinstance(value, base) and not isinstance(value, bool):
            base_encoder(value, feed)
            return
    raise Uncacheable(f"no canonical cache encoding for {type(value).__name__} arguments")


def _sequence(tag: bytes) -> Callable[[Sequence[Any], Feed], None]:
    def encode(value: Sequence[Any], feed: Feed) -> None:
        feed(tag + len(value).to_bytes(4, "big"))
        for item in value:
            _encode(item, feed)

    return encode


_ENCODERS: dict[type, Callable[[Any, Feed], None]] = {
    type(None): lambda v, feed: feed(b"N"),
    bool: lambda v, feed: feed(b"T" if v else b"F"),
    int: lambda v, feed: _text(b"i", str(v), feed),
    float: lambda v, feed: _text(b"f", repr(v), feed),
    str: lambda v, feed: _text(b"s", v, feed),
    bytes: lambda v, feed: feed(b"b" + len(v).to_bytes(4, "big") + v),
    uuid.UUID: lambda v, feed: feed(b"u" + v.bytes),
    decimal.Decimal: lambda v, feed: _text(b"d", str(v), feed),
    datetime.datetime: lambda v, feed: _text(b"t", v.isoformat(), feed),
    datetime.date: lambda v, feed: _text(b"D", v.isoformat(), feed),
    datetime.time: lambda v, feed: _text(b"h", v.isoformat(), feed),
    datetime.timedelta: lambda v, feed: _text(
        b"r", f"{v.days},{v.seconds},{v.microseconds}", feed
    ),
    # psycopg sends a list as an array and a tuple as a record: different statements.
    list: _sequence(b"["),
    tuple: _sequence(b"("),
}
