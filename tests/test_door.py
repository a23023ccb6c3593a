"""The door, on real servers: a wrong URL or a privileged role at `Database.open()` is a
`ConfigError` naming the setting, in one line, without the password, within
DB_CONNECT_TIMEOUT; an outage of the primary says so; the driver's own log records reach
loguru once, without the password."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from hcrepo import ConfigError, ConnectionLost, Database, PoolTimeout, Settings
from hcrepo.admin import migrate
from hcrepo.testing import PostgresServer, free_port
from tests.plugins.database import APP_PASSWORD
from tests.plugins.database import Database as ServerDatabase
from tests.support.errors import exception_chain
from tests.support.routing import TABLE, LogSink, Routing, ports

SECRET = "door-S3cret-pw"
CONNECT_TIMEOUT = 3.0
# Far above CONNECT_TIMEOUT: an error that waited for the pool would take this long.
POOL_TIMEOUT = 30.0


def _settings(url: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "database_url": url, "redis_url": "", "pool_min": 2, "pool_max": 4,
        "pool_acquire_timeout": POOL_TIMEOUT, "db_connect_timeout": CONNECT_TIMEOUT,
        "health_interval": 60.0, **overrides,
    }
    return Settings(**options)


@pytest.fixture
def bypass_role(migrated_db: ServerDatabase) -> Iterator[str]:
    """A login role with BYPASSRLS (not a superuser), password SECRET, dropped afterwards."""
    name = f"door_bypass_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(SECRET)))
    yield name
    with psycopg.connect(migrated_db.superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _bad_url(case: str, db: ServerDatabase, bypass: str) -> tuple[str, str, str]:
    """(URL, a phrase of the reason, the URL's password) for one kind of bad DATABASE_URL."""
    server = db.server
    app = migrate.APP_ROLE
    return {
        "wrong password": (server.url(user=app, password=SECRET, dbname=db.dbname),
                           "password authentication failed", SECRET),
        "nothing listening": (f"postgresql://{app}:{SECRET}@127.0.0.1:{free_port()}/x",
                              "Connection refused", SECRET),
        "missing database": (server.url(user=app, password=APP_PASSWORD, dbname="door_none"),
                             '"door_none" does not exist', APP_PASSWORD),
        "superuser": (db.superuser_url, "logs in as postgres, a superuser or BYPASSRLS role",
                      server.superuser_password),
        "bypassrls role": (server.url(user=bypass, password=SECRET, dbname=db.dbname),
                           f"logs in as {bypass}, a superuser or BYPASSRLS role", SECRET),
    }[case]


@pytest.mark.parametrize(
    "case",
    ["wrong password", "nothing listening", "missing database", "superuser", "bypassrls role"],
)
def test_a_bad_database_url_fails_open_at_once_naming_the_setting(
    migrated_db: ServerDatabase, bypass_role: str, log_sink: Any, case: str
) -> None:
    url, reason, password = _bad_url(case, migrated_db, bypass_role)
    logs: LogSink = log_sink("DEBUG")
    db = Database(_settings(url))
    began = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        db.open()
    took = time.monotonic() - began
    db.close()
    message = str(raised.value)
    assert raised.value.setting == "DATABASE_URL"
    assert message.startswith("DATABASE_URL: ") and reason in message
    assert "\n" not in message
    assert took < CONNECT_TIMEOUT  # not the 30 s pool timeout
    for error in exception_chain(raised.value):
        assert password not in str(error)
    assert len(logs.messages) <= 1
    assert not logs.matching(password)


def test_a_privileged_replica_url_fails_open_naming_read_replica_urls(
    migrated_db: ServerDatabase, pg_replica: PostgresServer
) -> None:
    db = Database(_settings(migrated_db.app_url,
                            read_replica_urls=[migrated_db.replica_superuser_url(pg_replica)]))
    with pytest.raises(ConfigError) as raised:
        db.open()
    db.close()
    assert raised.value.setting == "READ_REPLICA_URLS"
    assert "replica1" in str(raised.value) and "superuser or BYPASSRLS" in str(raised.value)
    assert pg_replica.superuser_password not in str(raised.value)


def test_no_pool_connection_is_handed_out_to_a_privileged_login(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, log_sink: Any
) -> None:
    # A replica unreachable at open() that later answers as the superuser, seen by its pool.
    logs: LogSink = log_sink("WARNING")
    superuser = migrated_db.replica_superuser_url(pg_replica)
    db = Database(_settings(migrated_db.app_url, read_replica_urls=[superuser], pool_min=0))
    try:
        with pytest.raises(PoolTimeout):
            db._router.replicas[0].acquire(0.5, explain=False)
    finally:
        db.close()
    refusals = logs.matching("psycopg.pool: ", "READ_REPLICA_URLS: replica1",
                             "superuser or BYPASSRLS")
    assert refusals and not logs.matching(pg_replica.superuser_password)


def test_a_replica_refusing_its_password_is_skipped_with_the_reason_logged_once(
    migrated_db: ServerDatabase, pg_replica: PostgresServer, log_sink: Any
) -> None:
    logs: LogSink = log_sink("WARNING")
    wrong = pg_replica.url(user=migrate.APP_ROLE, password=SECRET, dbname=migrated_db.dbname)
    db = Database(_settings(migrated_db.app_url, read_replica_urls=[wrong]))
    with db:
        assert set(ports(db, 3)) == {migrated_db.server.port}  # the primary serves
        [record] = logs.matching("replica1 taken out of read rotation")
        assert "password authentication failed" in record
        assert db.health()["nodes"]["replica1"]["up"] is False
    assert not logs.matching(SECRET)
    assert len(logs.messages) == 2  # the replica out, and reads degraded to the primary


# --- an outage at runtime ---------------------------------------------------------------


@pytest.fixture
def own_primary() -> Iterator[tuple[PostgresServer, str]]:
    """A throw-away primary of this test's own (it gets stopped) and an app-like role's URL."""
    with PostgresServer() as server:
        with psycopg.connect(server.superuser_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE door_app LOGIN PASSWORD {}").format(
                sql.Literal(SECRET)))
            conn.execute(TABLE)
            conn.execute("GRANT SELECT, INSERT ON routing_items TO door_app")
            conn.execute("GRANT USAGE ON SEQUENCE routing_items_id_seq TO door_app")
        yield server, server.url(user="door_app", password=SECRET)


def _outage_error(call: Any) -> BaseException:
    with pytest.raises((PoolTimeout, ConnectionLost)) as raised:
        call()
    return raised.value


def test_reads_and_writes_with_the_primary_down_say_it_is_unreachable(
    own_primary: tuple[PostgresServer, str], log_sink: Any
) -> None:
    server, url = own_primary
    logs: LogSink = log_sink("WARNING")
    db = Database(_settings(url, pool_min=1, pool_acquire_timeout=1.0))
    with db, db.context(actor_id=uuid.uuid4()):
        repo = Routing(db)
        assert repo.add_note(note="before") > 0
        assert repo.where_am_i() == server.port
        server.stop()
        for call in (repo.where_am_i, lambda: repo.add_note(note="during")):
            error = _outage_error(call)
            message = str(error)
            assert message.startswith(f"primary ({db._router.primary.address}) unreachable: ")
            assert "Connection refused" in message
            assert "pool stats" not in message and SECRET not in message
    pool_records = logs.matching("psycopg.pool: ")
    assert pool_records and not logs.matching(SECRET)


# --- the driver's log records ---------------------------------------------------------------


class _Stdlib(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_pool_warning_reaches_loguru_once_without_the_password(
    migrated_db: ServerDatabase, log_sink: Any
) -> None:
    logs: LogSink = log_sink("DEBUG")
    root = _Stdlib()
    logging.getLogger().addHandler(root)
    try:
        db = Database(_settings(migrated_db.app_url, pool_min=1))
        with db:
            primary = db._router.primary
            conn = primary.acquire()
            conn.close()  # returned closed: psycopg_pool warns and discards it
            primary.release(conn)
    finally:
        logging.getLogger().removeHandler(root)
    [record] = logs.matching("discarding closed connection")
    assert record.startswith("WARNING: psycopg.pool: discarding closed connection")
    assert APP_PASSWORD not in record
    assert not [r for r in root.records if r.name.startswith("psycopg")]  # not twice


def test_db_connect_timeout_is_a_positive_setting_in_whole_libpq_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:1/app")
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "0")
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert raised.value.setting == "DB_CONNECT_TIMEOUT"
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "0.2")
    db = Database(Settings.load(redis_url="", pool_min=0))
    assert db.settings.db_connect_timeout == 0.2
    assert db._router.primary.pool.kwargs["connect_timeout"] == 1
    db.close()
