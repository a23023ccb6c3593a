"""Schema migrations (yoyo) and the cluster-level bootstrap that must precede them.

`bootstrap` needs a superuser once per cluster and database: it creates the owner role and a
database the owner owns. Everything after that (`apply`, `rollback`, `status`) runs as the
owner role, never as a superuser and never as the application role.

Connection failures become `ConfigError` naming the setting the URL came from, with a
one-line cause and never the password (hcrepo.config.connect_failure).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations

from hcrepo.admin.connect import connect, conninfo_url, params
from hcrepo.config import connect_failure
from hcrepo.errors import ConfigError, HcrepoError
from hcrepo.shipped import shipped_dir

OWNER_ROLE = "hcrepo_owner"
APP_ROLE = "hcrepo_app"


class MigrationFailed(HcrepoError):
    """A migration's SQL failed; its transaction was rolled back, the database is unchanged."""

    def __init__(self, migration: str, sqlstate: str | None, message: str) -> None:
        super().__init__(f"migration {migration} failed [{sqlstate or '?'}]: {message}")
        self.migration = migration
        self.sqlstate = sqlstate


class MigrationState(NamedTuple):
    id: str
    applied: bool


def migrations_dir() -> Path:
    return shipped_dir("migrations")


def bootstrap(superuser_url: str, *, database: str, owner_password: str) -> str:
    """Create or update the owner role and its database; return the owner's URL.

    Idempotent: re-running sets the password again and leaves an existing database alone.
    """
    with connect(superuser_url, "superuser URL", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [OWNER_ROLE]).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(
                "{} ROLE {} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS NOCREATEDB PASSWORD {}"
            ).format(
                sql.SQL(verb),
                sql.Identifier(OWNER_ROLE),
                sql.Literal(_encrypted(conn, OWNER_ROLE, owner_password)),
            )
        )
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(OWNER_ROLE)
                )
            )
    with connect(conninfo_url(superuser_url, dbname=database), "superuser URL") as conn:
        # On PostgreSQL 14 and older public belongs to the bootstrap superuser.
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(OWNER_ROLE)))
    return conninfo_url(superuser_url, user=OWNER_ROLE, password=owner_password, dbname=database)


def set_role_password(owner_url: str, role: str, password: str) -> None:
    """Set a login role's password as the owner (CREATEROLE), e.g. for hcrepo_app."""
    with connect(owner_url, "owner URL", autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(_encrypted(conn, role, password))
            )
        )


def status(url: str, *, setting: str, source: Path | None = None) -> list[MigrationState]:
    """Every known migration, in order, and whether it is applied."""
    migrations = read_migrations(str(source or migrations_dir()))
    with _backend(url, setting) as backend:
        return [MigrationState(m.id, bool(backend.is_applied(m))) for m in migrations]


def apply(url: str, *, setting: str, source: Path | None = None) -> list[str]:
    """Apply every pending migration, each in its own transaction; return their ids."""
    migrations = read_migrations(str(source or migrations_dir()))
    with _backend(url, setting) as backend, backend.lock():
        pending = backend.to_apply(migrations)
        _run(backend.apply_one, pending)
        return [m.id for m in pending]


def rollback(
    url: str, *, setting: str, count: int | None = 1, source: Path | None = None
) -> list[str]:
    """Roll back the last `count` applied migrations (None: all); return their ids."""
    migrations = read_migrations(str(source or migrations_dir()))
    with _backend(url, setting) as backend, backend.lock():
        applied = list(backend.to_rollback(migrations))
        chosen = applied if count is None else applied[:count]
        _run(backend.rollback_one, chosen)
        return [m.id for m in chosen]


def _run(step: Any, migrations: Any) -> None:
    for migration in migrations:
        try:
            step(migration)
        except psycopg.Error as exc:
            # The primary message only: DETAIL lines can quote row values (PHI).
            primary = exc.diag.message_primary or type(exc).__name__
            raise MigrationFailed(migration.id, exc.sqlstate, primary) from None


@contextmanager
def _backend(url: str, setting: str) -> Iterator[Any]:
    try:
        backend = get_backend(_yoyo_uri(url, setting))
    except psycopg.OperationalError as exc:
        raise ConfigError(setting, f"cannot connect: {connect_failure(exc, url)}") from None
    try:
        yield backend
    finally:
        backend.connection.close()


def _yoyo_uri(url: str, setting: str) -> str:
    # yoyo's psycopg 3 backend is the postgresql+psycopg scheme; it hands query arguments to
    # psycopg.connect unchanged, so every conninfo parameter (sockets, sslmode...) survives.
    return f"postgresql+psycopg:///?{urlencode(params(url, setting))}"


def _encrypted(conn: psycopg.Connection, role: str, password: str) -> str:
    # Hashed client-side (libpq, the server's algorithm) so the clear password never
    # reaches the server's statement log.
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode())
    return verifier.decode()
