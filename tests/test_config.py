"""Settings come from the deployment's variable names; a wrong value names its variable."""

from __future__ import annotations

import pytest

from hcrepo import ConfigError, Database, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "READ_REPLICA_URLS", "REDIS_URL", "DB_POOL_MIN", "DB_POOL_MAX",
                 "HCREPO_OWNER_URL", "CACHE_ENABLED", "SLOW_QUERY_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)


def test_a_missing_database_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as raised:
        Database.from_env()
    assert raised.value.setting == "DATABASE_URL"
    assert "required" in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("DATABASE_URL", "nonsense", "not a valid PostgreSQL URL"),
        ("DB_POOL_MAX", "many", "integer"),
        ("DB_POOL_MIN", "20", "must not exceed DB_POOL_MAX"),
        ("REDIS_URL", "http://cache", "must start with"),
        ("SLOW_QUERY_THRESHOLD", "-1", "greater than or equal"),
        ("CACHE_ENABLED", "perhaps", "boolean"),
        ("HCREPO_OWNER_URL", "host=a junk", "not a valid PostgreSQL URL"),
    ],
)
def test_a_wrong_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:secret@127.0.0.1:1/app")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert raised.value.setting == variable
    assert problem in str(raised.value)
    assert "secret" not in str(raised.value)


def test_deployment_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:1/app")
    monkeypatch.setenv("DB_POOL_MIN", "1")
    monkeypatch.setenv("DB_POOL_MAX", "3")
    monkeypatch.setenv("CACHE_ENABLED", "false")
    monkeypatch.setenv("SLOW_QUERY_THRESHOLD", "250")
    settings = Settings.load()
    assert (settings.pool_min, settings.pool_max) == (1, 3)
    assert settings.cache_enabled is False
    assert settings.slow_query_threshold_ms == 250
    assert settings.migration_url == "postgresql://app@127.0.0.1:1/app"
    monkeypatch.setenv("HCREPO_OWNER_URL", "postgresql://owner@127.0.0.1:1/app")
    assert Settings.load().migration_url == "postgresql://owner@127.0.0.1:1/app"


@pytest.mark.parametrize("value", ["notjson", '{"patient": 60', "[1, 2"])
def test_a_json_setting_that_does_not_decode_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:secret@127.0.0.1:1/app")
    monkeypatch.setenv("HCREPO_CACHE_TTL_PRESETS", value)
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert raised.value.setting == "HCREPO_CACHE_TTL_PRESETS"
    assert str(raised.value).startswith("HCREPO_CACHE_TTL_PRESETS: is not valid JSON (")
    assert value not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
