"""Durations read the same way in every setting and in SQL directives: 500ms, 2s, 1.5min, 1h;
a bare number keeps the setting's documented unit."""

from __future__ import annotations

import pytest

from hcrepo import ConfigError, Settings
from hcrepo.sqlfile import parse

URL = "postgresql://hcrepo_app@127.0.0.1:1/db"


@pytest.mark.parametrize(("given", "seconds"), [
    ("500ms", 0.5), ("2s", 2.0), ("1.5min", 90.0), ("1h", 3600.0), ("7", 7.0), (" 3s ", 3.0),
])
def test_a_duration_setting_takes_units_or_seconds(given: str, seconds: float) -> None:
    settings = Settings.load(database_url=URL, pool_acquire_timeout=given, health_interval=given)
    assert (settings.pool_acquire_timeout, settings.health_interval) == (seconds, seconds)


def test_milliseconds_and_whole_seconds_keep_their_units() -> None:
    settings = Settings.load(database_url=URL, slow_query_threshold_ms="0.25s", cache_ttl="5min")
    assert (settings.slow_query_threshold_ms, settings.cache_ttl) == (250.0, 300)
    assert Settings.load(database_url=URL, slow_query_threshold_ms="40").slow_query_threshold_ms \
        == 40.0


def test_a_bad_duration_names_the_variable_and_the_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("DB_POOL_ACQUIRE_TIMEOUT", "5 parsecs")
    with pytest.raises(ConfigError, match=r"^DB_POOL_ACQUIRE_TIMEOUT: .*500ms, 2s") as raised:
        Settings.load()
    assert "parsecs" not in str(raised.value)


def test_sql_timeouts_read_the_same_forms() -> None:
    queries = parse("-- name: a\n-- timeout: 1.5min\nSELECT 1\n-- name: b\n-- timeout: 1h\n"
                    "SELECT 2", "inline.sql")
    assert (queries["a"].timeout_ms, queries["b"].timeout_ms) == (90_000, 3_600_000)
