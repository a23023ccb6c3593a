"""Settings read from the environment (pydantic-settings).

Names follow the deployment files hcrepo replaces (`DATABASE_URL`, `READ_REPLICA_URLS`,
`REDIS_URL`, `DB_POOL_*`, `CACHE_*`); hcrepo-only settings carry the `HCREPO_` prefix.
Every validation failure is re-raised as `ConfigError` naming the environment variable.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from enum import StrEnum
from typing import Annotated, Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from hcrepo import durations
from hcrepo.crypto.blind_index import BlindIndex
from hcrepo.crypto.keys import SettingsMasterKeys, key_bytes, parse_versioned
from hcrepo.errors import ConfigError

# Durations accept units (`500ms`, `2s`, `1.5min`); a bare number is in the field's unit.
Seconds = Annotated[float, BeforeValidator(durations.setting)]
WholeSeconds = Annotated[int, BeforeValidator(durations.setting)]
Milliseconds = Annotated[float, BeforeValidator(lambda value: durations.setting(value, 0.001))]


class RoutingPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_BUSY = "least_busy"
    LOWEST_LATENCY = "lowest_latency"


def _setting(name: str, default: Any = ..., **constraints: Any) -> Any:
    """A field read from exactly the environment variable `name` (no prefix magic)."""
    return Field(default, validation_alias=AliasChoices(name), alias=name, **constraints)


def cache_key_bytes(text: str) -> bytes:
    """HCREPO_CACHE_ENCRYPTION_KEY: base64 (standard or URL-safe) of a 16, 24 or 32 byte key."""
    try:
        raw = base64.b64decode(text.strip().replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 of a 16, 24 or 32 byte AES key") from None
    if len(raw) not in (16, 24, 32):
        raise ValueError(f"decodes to {len(raw)} bytes; an AES key has 16, 24 or 32")
    return raw


def server_options(url: str, **settings: object) -> str:
    """The URL's own `options` with `-c name=value` for each of `settings` appended, for a
    connection that must start with those server settings whatever the URL says."""
    given = str(conninfo_to_dict(url).get("options") or "")
    extra = " ".join(f"-c {name}={value}" for name, value in settings.items())
    return f"{given} {extra}".strip()


def connect_failure(exc: psycopg.Error, url: str) -> str:
    """libpq's multi-line message of a failed connection as one line, without the URL's
    password. It holds what libpq and the server say about reaching and logging in (host,
    port, user, database), never a value: no statement ran."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    password = conninfo_to_dict(url).get("password")
    if password:
        text = text.replace(str(password), "***")
    return text or type(exc).__name__


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

    database_url: str = _setting("DATABASE_URL")
    read_replica_urls: Annotated[list[str], NoDecode] = _setting(
        "READ_REPLICA_URLS", default_factory=list
    )
    owner_url: str | None = _setting("HCREPO_OWNER_URL", None)
    redis_url: str = _setting("REDIS_URL", "")

    pool_min: int = _setting("DB_POOL_MIN", 2, ge=0)
    pool_max: int = _setting("DB_POOL_MAX", 10, ge=1)
    pool_acquire_timeout: Seconds = _setting("DB_POOL_ACQUIRE_TIMEOUT", 5.0, gt=0)
    pool_idle_timeout: Seconds = _setting("DB_POOL_IDLE_TIMEOUT", 600.0, gt=0)
    pool_max_lifetime: Seconds = _setting("HCREPO_POOL_MAX_LIFETIME", 3600.0, gt=0)
    pool_max_waiting: int = _setting("HCREPO_POOL_MAX_WAITING", 0, ge=0)
    pool_leak_threshold: Seconds = _setting("HCREPO_POOL_LEAK_THRESHOLD", 30.0, gt=0)
    # libpq's connect_timeout of pool connections (whole seconds, at least 1) and how long
    # Database.open() waits for the primary: a wrong URL fails within it, not the pool timeout.
    db_connect_timeout: Seconds = _setting("DB_CONNECT_TIMEOUT", 30.0, gt=0)
    # Lets DATABASE_URL and READ_REPLICA_URLS log in as a superuser or a BYPASSRLS role, which
    # Database.open() otherwise refuses: row-level security would not apply to it. For test
    # rigs without an application role only.
    allow_privileged_role: bool = _setting("HCREPO_ALLOW_PRIVILEGED_ROLE", False)

    health_interval: Seconds = _setting("HCREPO_HEALTH_INTERVAL", 1.0, gt=0)
    max_lag_seconds: Seconds = _setting("HCREPO_MAX_LAG_SECONDS", 5.0, gt=0)
    max_lag_bytes: int = _setting("HCREPO_MAX_LAG_BYTES", 16 * 1024 * 1024, gt=0)
    routing_policy: RoutingPolicy = _setting("HCREPO_ROUTING_POLICY", RoutingPolicy.ROUND_ROBIN)
    breaker_failures: int = _setting("HCREPO_BREAKER_FAILURES", 3, ge=1)
    breaker_reset: Seconds = _setting("HCREPO_BREAKER_RESET", 2.0, gt=0)
    # statement_timeout and connect timeout of health probes, and of a breaker's trial.
    health_timeout: Seconds = _setting("HCREPO_HEALTH_TIMEOUT", 1.0, gt=0)
    # A cached replica replay position older than this is re-read when a read-your-writes
    # check needs a newer one (0: whenever it falls short).
    replay_cache_max_age: Seconds = _setting("HCREPO_REPLAY_CACHE_MAX_AGE", 0.02, ge=0)

    cache_enabled: bool = _setting("CACHE_ENABLED", True)
    cache_ttl: WholeSeconds = _setting("CACHE_TTL", 300, gt=0)
    cache_ttl_presets: dict[str, int] = _setting(
        "HCREPO_CACHE_TTL_PRESETS",
        default_factory=lambda: {"clinic": 3600, "patient": 1800, "appointment": 300,
                                 "emergency": 60},
    )
    cache_key_prefix: str = _setting("HCREPO_CACHE_PREFIX", "hc", min_length=1)
    cache_encryption_key: SecretStr | None = _setting("HCREPO_CACHE_ENCRYPTION_KEY", None)
    cache_socket_timeout: Seconds = _setting("HCREPO_CACHE_SOCKET_TIMEOUT", 0.25, gt=0)
    # Past ratio x TTL a value is stale: served while one caller refreshes it in the background.
    cache_soft_ttl_ratio: float = _setting("HCREPO_CACHE_SOFT_TTL_RATIO", 0.8, gt=0, le=1)
    # How long one caller may hold a key's fill lock, and how long others wait for it.
    cache_lock_timeout: Seconds = _setting("HCREPO_CACHE_LOCK_TIMEOUT", 2.0, gt=0)
    # Probabilistic early refresh (XFetch); 0 turns it off.
    cache_xfetch_beta: float = _setting("HCREPO_CACHE_XFETCH_BETA", 1.0, ge=0)

    # Off behind a pooler that cannot keep named prepared statements per client (PgBouncer
    # before 1.21 in transaction mode): every statement is then parsed unnamed, in its batch.
    prepared_statements: bool = _setting("HCREPO_PREPARED_STATEMENTS", True)

    # Field encryption (hcrepo.compliance): the current master key, `[version:]base64` of 32
    # bytes; the previous ones, `version:base64,...`, until `hcrepo keys rotate --master`
    # has re-wrapped every data key; the root key of the blind indexes, base64 of 32 bytes.
    master_key: SecretStr | None = _setting("HCREPO_MASTER_KEY", None)
    master_key_previous: SecretStr | None = _setting("HCREPO_MASTER_KEY_PREVIOUS", None)
    blind_index_key: SecretStr | None = _setting("HCREPO_BLIND_INDEX_KEY", None)

    slow_query_threshold_ms: Milliseconds = _setting("SLOW_QUERY_THRESHOLD", 500.0, ge=0)

    # The PHI access log (hcrepo.compliance.access_log). Off breaks HIPAA's access
    # accounting: for tests and benchmarks only.
    access_log: bool = _setting("ACCESS_LOG", True)
    # How long a recorded read may wait in memory before it is written (what kill -9 loses),
    # and how many waiting rows start a write at once.
    access_log_flush_interval: Seconds = _setting("ACCESS_LOG_FLUSH_INTERVAL", 1.0, gt=0)
    access_log_batch_rows: int = _setting("ACCESS_LOG_BATCH_ROWS", 1000, ge=1)
    # Rows kept in memory while the primary cannot take them; beyond, they go to the spill
    # file (0: every batch that fails is spilled at once).
    access_log_max_buffered: int = _setting("ACCESS_LOG_MAX_BUFFERED", 10_000, ge=0)
    # Directory of the spill files (0600, fsynced per batch); unset: rows past
    # ACCESS_LOG_MAX_BUFFERED are dropped, counted and logged.
    access_log_spill_dir: str | None = _setting("ACCESS_LOG_SPILL_DIR", None)
    # The audit sealer thread Database.open() starts (hcrepo.compliance.sealer): how often it
    # links committed audit rows into the hash chain. Off where a cron job runs
    # `hcrepo audit seal` instead; any number of processes may run one (one seals at a time).
    audit_sealer: bool = _setting("AUDIT_SEALER", True)
    audit_seal_interval: Seconds = _setting("AUDIT_SEAL_INTERVAL", 0.2, gt=0)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_url(value)

    @field_validator("access_log_spill_dir")
    @classmethod
    def _spill_dir(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

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

    @field_validator("cache_ttl_presets")
    @classmethod
    def _ttl_presets(cls, value: dict[str, int]) -> dict[str, int]:
        bad = sorted(name for name, seconds in value.items() if seconds <= 0)
        if bad:
            raise ValueError(f"TTLs must be positive seconds (check {', '.join(bad)})")
        return value

    @field_validator("cache_key_prefix")
    @classmethod
    def _cache_prefix(cls, value: str) -> str:
        # Braces would change the Redis Cluster hash tag hcrepo puts in every key.
        if any(c in value for c in "{} \t\r\n"):
            raise ValueError("must not contain braces or whitespace")
        return value

    @field_validator("cache_encryption_key")
    @classmethod
    def _cache_encryption_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        cache_key_bytes(value.get_secret_value())
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if len(parse_versioned(value.get_secret_value(), default_version=1)) != 1:
            raise ValueError("holds exactly one key (older ones go in "
                             "HCREPO_MASTER_KEY_PREVIOUS)")
        return value

    @field_validator("master_key_previous")
    @classmethod
    def _master_key_previous(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        parse_versioned(value.get_secret_value(), default_version=None)
        return value

    @field_validator("blind_index_key")
    @classmethod
    def _blind_index_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        key_bytes(value.get_secret_value())
        return value

    def master_keys(self) -> SettingsMasterKeys | None:
        """The master keys of HCREPO_MASTER_KEY(_PREVIOUS); None when no key is set."""
        if self.master_key is None:
            return None
        previous = self.master_key_previous
        return SettingsMasterKeys(self.master_key.get_secret_value(),
                                  previous.get_secret_value() if previous else "")

    def blind_index(self) -> BlindIndex | None:
        if self.blind_index_key is None:
            return None
        return BlindIndex(key_bytes(self.blind_index_key.get_secret_value()))

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
        except SettingsError as exc:
            # pydantic-settings decodes JSON-valued variables before validation and raises
            # its own error, naming the field only inside its message.
            raise _decoding_error(exc) from None


class AuditSettings(BaseSettings):
    """What the audit commands read (`hcrepo audit`, `hcrepo retention`, patient_trail): no
    DATABASE_URL needed, since an auditor's machine may hold only the auditor's URL."""

    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", frozen=True, validate_default=True
    )

    auditor_url: str | None = _setting("HCREPO_AUDITOR_URL", None)
    owner_url: str | None = _setting("HCREPO_OWNER_URL", None)
    # The HMAC key of `hcrepo audit digest`: kept outside the database, so that whoever can
    # rewrite the audit tables cannot sign a digest of the rewritten chain.
    digest_key: SecretStr | None = _setting("HCREPO_AUDIT_DIGEST_KEY", None)
    audit_retention_days: int = _setting("AUDIT_RETENTION_DAYS", 2555, ge=1)
    access_log_retention_days: int = _setting("ACCESS_LOG_RETENTION_DAYS", 2555, ge=1)

    @field_validator("auditor_url", "owner_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if not value else _check_url(value)

    @field_validator("digest_key")
    @classmethod
    def _digest_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().encode()) < 16:
            raise ValueError("must be at least 16 bytes")
        return value

    @classmethod
    def load(cls, **overrides: Any) -> AuditSettings:
        """From the environment plus overrides; `ConfigError` naming the setting on error."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise _as_config_error(exc, cls) from None
        except SettingsError as exc:
            raise _decoding_error(exc, cls) from None

    def require(self, field: str) -> str:
        """The value of an optional URL or key setting, or `ConfigError` saying it is unset."""
        value = getattr(self, field)
        if value is None:
            raise ConfigError(_setting_name(field, type(self)), "is required but not set")
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _setting_name(field_name: str, model: type[BaseSettings] = Settings) -> str:
    field = model.model_fields.get(field_name)
    return field.alias if field is not None and field.alias else field_name


def _decoding_error(exc: SettingsError, model: type[BaseSettings] = Settings) -> ConfigError:
    found = re.search(r'field "(\w+)"', str(exc))
    setting = _setting_name(found.group(1), model) if found else "settings"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        # msg and pos only: the decoder's full text quotes no value, but keep it that way.
        return ConfigError(setting, f"is not valid JSON ({cause.msg} at character {cause.pos})")
    return ConfigError(setting, "cannot be decoded")


def _as_config_error(exc: ValidationError, model: type[BaseSettings] = Settings) -> ConfigError:
    error = exc.errors(include_url=False, include_input=False)[0]
    location = error.get("loc") or ("settings",)
    setting = _setting_name(str(location[0]), model)
    if error.get("type") == "missing":
        return ConfigError(setting, "is required but not set")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not error.get("loc"):
        # A cross-field check: its message starts with the setting it blames.
        setting, _, message = message.partition(" ")
    return ConfigError(setting, message)
