"""What a cached plan needs at every call (its key prefix, codec, TTLs, metric children),
worked out once per (plan, SQL text); and why a plan is not cached at all."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter

from hcrepo.cache.codec import CODEC_VERSION, ValueCodec, value_type
from hcrepo.cache.keys import plan_id
from hcrepo.config import Settings
from hcrepo.errors import ConfigError
from hcrepo.ops import metrics
from hcrepo.phi.logs import logger
from hcrepo.tenancy import POLICY_INPUTS

if TYPE_CHECKING:
    from hcrepo.plan import Plan


class Counters(NamedTuple):
    """A query's metric children, bound once (label lookup is the slow part)."""

    hits: Counter
    misses: Counter
    stale: Counter
    refreshes: Counter
    bytes_read: Counter
    bytes_written: Counter

    @classmethod
    def bind(cls, query: str) -> Counters:
        return cls(
            metrics.CACHE_HITS.labels(query=query),
            metrics.CACHE_MISSES.labels(query=query),
            metrics.CACHE_STALE.labels(query=query),
            metrics.CACHE_REFRESHES.labels(query=query),
            metrics.CACHE_BYTES.labels(query=query, direction="read"),
            metrics.CACHE_BYTES.labels(query=query, direction="written"),
        )


class Spec(NamedTuple):
    """What one (plan, SQL text) needs at every call, worked out on its first call."""

    query: str
    plan_id: str
    keyed: tuple[str, ...]  # the Context fields besides the clinic its entries are keyed by
    codec: ValueCodec
    ttl_ms: int
    soft_ms: int
    counters: Counters


class Specs:
    """The specs of one cache, by (plan, SQL text)."""

    def __init__(self, settings: Settings, cipher: AESGCM | None) -> None:
        self._settings = settings
        self._cipher = cipher
        self._specs: dict[tuple[Plan, str], Spec | Counter] = {}
        self._warned: set[str] = set()

    def get(self, plan: Plan, sql: str) -> Spec | Counter:
        """The plan's spec, or the bypass counter to bump when it must not be cached."""
        found = self._specs.get((plan, sql))
        return found if found is not None else self._make(plan, sql)

    def _make(self, plan: Plan, sql: str) -> Spec | Counter:
        spec: Spec | Counter
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
            spec = Spec(
                query=plan.name,
                plan_id=plan_id(plan.name, sql,
                                [codec.schema, codec.encrypts, plan.cache.tags, keyed],
                                CODEC_VERSION),
                keyed=keyed,
                codec=codec,
                ttl_ms=int(ttl * 1000),
                soft_ms=int(ttl * 1000 * self._settings.cache_soft_ttl_ratio),
                counters=Counters.bind(plan.name),
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
