"""Settings read from the environment (pydantic-settings).

Names follow the deployment files hcrepo replaces (`DATABASE_URL`, `READ_REPLICA_URLS`,
`REDIS_URL`, `DB_POOL_*`, `CACHE_*`); hcrepo-only settings carry the `HCREPO_` prefix.
Every validation failure is re-raised as `ConfigError` naming the environment variable.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Self

from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hcrepo.errors import ConfigError


class RoutingPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_BUSY = "least_busy"
    LOWEST_LATENCY = "lowest_latency"


def _env(name: str) -> Any:
    """Bind a field to exactly one environment variable name (no prefix magic)."""
    return Field(validation_alias=AliasChoices(name), alias=name)


def _check_url(value: str) -> str:
    try:
        conninfo_to_dict(value)
    except Exception as exc:  # psycopg raises ProgrammingError with the parse problem
        raise ValueError(f"not a valid PostgreSQL URL ({type(exc).__name__})") from None
    return value


class Settings(BaseSettings):
    """Everything hcrepo reads from the environment. Construct directly in tests."""

    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", frozen=True, validate_default=True
    )

    database_url: str = _env("DATABASE_URL")
    read_replica_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("READ_REPLICA_URLS"),
        alias="READ_REPLICA_URLS",
    )
    owner_url: str | None = Field(
        default=None, validation_alias=AliasChoices("HCREPO_OWNER_URL"), alias="HCREPO_OWNER_URL"
    )
    redis_url: str = Field(default="", validation_alias=AliasChoices("REDIS_URL"), alias="REDIS_URL")

    pool_min: int = Field(default=2, ge=0, validation_alias=AliasChoices("DB_POOL_MIN"),
                          alias="DB_POOL_MIN")
    pool_max: int = Field(default=10, ge=1, validation_alias=AliasChoices("DB_POOL_MAX"),
                          alias="DB_POOL_MAX")
    pool_acquire_timeout: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("DB_POOL_ACQUIRE_TIMEOUT"),
        alias="DB_POOL_ACQUIRE_TIMEOUT",
    )
    pool_idle_timeout: float = Field(
        default=600.0, gt=0, validation_alias=AliasChoices("DB_POOL_IDLE_TIMEOUT"),
        alias="DB_POOL_IDLE_TIMEOUT",
    )
    pool_max_lifetime: float = Field(
        default=3600.0, gt=0, validation_alias=AliasChoices("HCREPO_POOL_MAX_LIFETIME"),
        alias="HCREPO_POOL_MAX_LIFETIME",
    )
    pool_max_waiting: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("HCREPO_POOL_MAX_WAITING"),
        alias="HCREPO_POOL_MAX_WAITING",
    )
    pool_leak_threshold: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("HCREPO_POOL_LEAK_THRESHOLD"),
        alias="HCREPO_POOL_LEAK_THRESHOLD",
    )

    health_interval: float = Field(
        default=1.0, gt=0, validation_alias=AliasChoices("HCREPO_HEALTH_INTERVAL"),
        alias="HCREPO_HEALTH_INTERVAL",
    )
    max_lag_seconds: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("HCREPO_MAX_LAG_SECONDS"),
        alias="HCREPO_MAX_LAG_SECONDS",
    )
    max_lag_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, validation_alias=AliasChoices("HCREPO_MAX_LAG_BYTES"),
        alias="HCREPO_MAX_LAG_BYTES",
    )
    routing_policy: RoutingPolicy = Field(
        default=RoutingPolicy.ROUND_ROBIN, validation_alias=AliasChoices("HCREPO_ROUTING_POLICY"),
        alias="HCREPO_ROUTING_POLICY",
    )
    breaker_failures: int = Field(
        default=3, ge=1, validation_alias=AliasChoices("HCREPO_BREAKER_FAILURES"),
        alias="HCREPO_BREAKER_FAILURES",
    )
    breaker_reset: float = Field(
        default=2.0, gt=0, validation_alias=AliasChoices("HCREPO_BREAKER_RESET"),
        alias="HCREPO_BREAKER_RESET",
    )

    cache_enabled: bool = Field(default=True, validation_alias=AliasChoices("CACHE_ENABLED"),
                                alias="CACHE_ENABLED")
    cache_ttl: int = Field(default=300, gt=0, validation_alias=AliasChoices("CACHE_TTL"),
                           alias="CACHE_TTL")
    cache_ttl_presets: dict[str, int] = Field(
        default_factory=lambda: {"clinic": 3600, "patient": 1800, "appointment": 300,
                                 "emergency": 60},
        validation_alias=AliasChoices("HCREPO_CACHE_TTL_PRESETS"),
        alias="HCREPO_CACHE_TTL_PRESETS",
    )
    cache_key_prefix: str = Field(
        default="hc", min_length=1, validation_alias=AliasChoices("HCREPO_CACHE_PREFIX"),
        alias="HCREPO_CACHE_PREFIX",
    )
    cache_encryption_key: str | None = Field(
        default=None, validation_alias=AliasChoices("HCREPO_CACHE_ENCRYPTION_KEY"),
        alias="HCREPO_CACHE_ENCRYPTION_KEY",
    )
    cache_socket_timeout: float = Field(
        default=0.25, gt=0, validation_alias=AliasChoices("HCREPO_CACHE_SOCKET_TIMEOUT"),
        alias="HCREPO_CACHE_SOCKET_TIMEOUT",
    )

    slow_query_threshold_ms: float = Field(
        default=500.0, ge=0, validation_alias=AliasChoices("SLOW_QUERY_THRESHOLD"),
        alias="SLOW_QUERY_THRESHOLD",
    )
    audit_retention_days: int = Field(
        default=2555, ge=1, validation_alias=AliasChoices("AUDIT_RETENTION_DAYS"),
        alias="AUDIT_RETENTION_DAYS",
    )
    max_page_size: int = Field(
        default=1000, ge=1, validation_alias=AliasChoices("HCREPO_MAX_PAGE_SIZE"),
        alias="HCREPO_MAX_PAGE_SIZE",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_url(value)

    @field_validator("owner_url")
    @classmethod
    def _owner_url(cls, value: str | None) -> str | None:
        return None if not value else _check_url(value)

    @field_validator("read_replica_urls", mode="before")
    @classmethod
    def _split_replicas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("read_replica_urls")
    @classmethod
    def _replica_urls(cls, value: list[str]) -> list[str]:
        return [_check_url(url) for url in value]

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster://")
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> Self:
        if self.pool_min > self.pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        return self

    @property
    def migration_url(self) -> str:
        """The owner role's URL for `hcrepo migrate`, falling back to DATABASE_URL."""
        return self.owner_url or self.database_url

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from the environment plus overrides; raise `ConfigError` on error."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise _as_config_error(exc) from None


def _as_config_error(exc: ValidationError) -> ConfigError:
    error = exc.errors(include_url=False, include_input=False)[0]
    location = error.get("loc") or ("settings",)
    name = str(location[0])
    field = Settings.model_fields.get(name)
    setting = field.alias if field is not None and field.alias else name
    if error.get("type") == "missing":
        return ConfigError(setting, "is required but not set")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not error.get("loc"):
        # A cross-field check: its message starts with the setting it blames.
        setting, _, message = message.partition(" ")
    return ConfigError(setting, message)
