"""Schema migrations (yoyo) and the cluster-level bootstrap that must precede them.

`bootstrap` needs a superuser once per cluster and database: it creates the owner role and a
database the owner owns. Everything after that (`apply`, `rollback`, `status`) runs as the
owner role, never as a superuser and never as the application role.

Connection failures become `ConfigError` naming the setting the URL came from, with a
one-line cause and never the password (hcrepo.config.connect_failure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import psycopg
from pglast import ast, enums, parser
from psycopg import sql
from psycopg.rows import dict_row
from yoyo import get_backend, read_migrations

from hcrepo.admin.connect import connect, conninfo_url, params
from hcrepo.config import connect_failure
from hcrepo.errors import ConfigError, HcrepoError
from hcrepo.shipped import shipped_dir

OWNER_ROLE = "hcrepo_owner"
APP_ROLE = "hcrepo_app"
# Reads the audit schema across clinics and nothing else (migrations/0006_audit.sql).
AUDITOR_ROLE = "hcrepo_auditor"


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


class MigrationRefused(ConfigError):
    """The connected role cannot do what the migrations need; nothing was applied."""


# Role attributes that let a role read past row-level security (or, for the application
# role, grow into one that can); the migrations' policies assume neither role has them.
_UNSAFE = {"rolsuper": "SUPERUSER", "rolbypassrls": "BYPASSRLS", "rolcreaterole": "CREATEROLE",
           "rolcreatedb": "CREATEDB", "rolreplication": "REPLICATION"}
_OWNER_UNSAFE = ("rolsuper", "rolbypassrls")
_ROLE_ATTRIBUTES = {
    # CREATEROLE lets the owner reset hcrepo_app's password and recreate it after a full
    # rollback; an adopted owner keeps whatever CREATEROLE it had (migrate needs none).
    OWNER_ROLE: "LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS NOCREATEDB",
    APP_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION",
    AUDITOR_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION",
}
_ROLE_SQL = "SELECT * FROM pg_roles WHERE rolname = %s"


def bootstrap(
    superuser_url: str, *, database: str, owner_password: str, app_password: str | None = None,
    auditor_password: str | None = None, setting: str = "superuser URL",
    report: Callable[[str], None] | None = None,
) -> str:
    """Create or adopt the owner role, the application role and a database the owner owns;
    return the owner's URL. Needs a superuser, or a role with CREATEROLE and CREATEDB (a
    managed service's administrator).

    Idempotent: re-running sets the passwords again and changes nothing else. An existing
    role with attributes that defeat row-level security is refused before anything changes.
    `app_password` None leaves hcrepo_app's password as it is; hcrepo_auditor gets a login
    only with an `auditor_password` (None: a new one is created without a login, an existing
    one is left as it is); `report` gets one line per role and for the database.
    """
    say = report or (lambda _line: None)
    with connect(superuser_url, setting, autocommit=True) as conn, _translated(setting):
        roles = {name: _role(conn, name) for name in (OWNER_ROLE, APP_ROLE, AUDITOR_ROLE)}
        me = _role(conn, None)
        assert me is not None  # the connected role exists
        _refuse_bootstrap(setting, conn, database, roles, me)
        say(_ensure_role(conn, OWNER_ROLE, roles[OWNER_ROLE], owner_password))
        say(_ensure_role(conn, APP_ROLE, roles[APP_ROLE], app_password))
        say(_ensure_role(conn, AUDITOR_ROLE, roles[AUDITOR_ROLE], auditor_password))
        if not me["rolsuper"]:
            # CREATE/ALTER DATABASE ... OWNER needs a non-superuser to be a member of it.
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(OWNER_ROLE)))
        say(_ensure_database(conn, database))
    target = conninfo_url(superuser_url, dbname=database)
    with connect(target, setting) as conn, _translated(setting):
        # On PostgreSQL 14 and older public belongs to the bootstrap superuser.
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(OWNER_ROLE)))
    return conninfo_url(superuser_url, user=OWNER_ROLE, password=owner_password, dbname=database)


def _refuse_bootstrap(
    setting: str, conn: psycopg.Connection, database: str,
    roles: dict[str, dict[str, Any] | None], me: dict[str, Any],
) -> None:
    problems = [
        unsafe for name, role in roles.items() if role is not None and (
            unsafe := _unsafe_role(name, role, _OWNER_UNSAFE if name == OWNER_ROLE
                                   else tuple(_UNSAFE)))
    ]
    if not me["rolsuper"] and not me["rolcreaterole"]:
        problems.append(f"{me['rolname']} is neither a superuser nor has CREATEROLE")
    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
    if not exists and not me["rolsuper"] and not me["rolcreatedb"]:
        problems.append(f"database {database} does not exist and {me['rolname']} lacks CREATEDB")
    if problems:
        raise ConfigError(setting, "; ".join(problems) + "; nothing changed")


def _unsafe_role(name: str, role: dict[str, Any], attributes: Sequence[str]) -> str | None:
    unsafe = [_UNSAFE[attribute] for attribute in attributes if role[attribute]]
    if not unsafe:
        return None
    undo = " ".join(f"NO{_UNSAFE[attribute]}" for attribute in attributes)
    return (f"role {name} exists with {', '.join(unsafe)}, which defeats tenant isolation "
            f"(as a superuser: ALTER ROLE {name} {undo})")


def _role(conn: psycopg.Connection, name: str | None) -> dict[str, Any] | None:
    """The pg_roles row of `name` (None: the connected role), or None when it is missing."""
    cursor = conn.cursor(row_factory=dict_row)
    if name is None:
        return cursor.execute("SELECT * FROM pg_roles WHERE rolname = current_user").fetchone()
    return cursor.execute(_ROLE_SQL, [name]).fetchone()


def _ensure_role(
    conn: psycopg.Connection, name: str, existing: dict[str, Any] | None, password: str | None
) -> str:
    if name == AUDITOR_ROLE and password is None:
        # Nobody reads the audit trail until someone is given its password.
        if existing is not None:
            return f"role {name}: exists, kept"
        conn.execute(sql.SQL("CREATE ROLE {} {}").format(
            sql.Identifier(name), sql.SQL(_ROLE_ATTRIBUTES[name].replace("LOGIN", "NOLOGIN", 1))))
        return f"role {name}: created without a login"
    verb, attributes = ("ALTER", "LOGIN") if existing else ("CREATE", _ROLE_ATTRIBUTES[name])
    statement = sql.SQL("{} ROLE {} {}").format(
        sql.SQL(verb), sql.Identifier(name), sql.SQL(attributes)
    )
    if password is not None:
        statement += _password(conn, name, password)
    conn.execute(statement)
    done = "created" if existing is None else "exists, kept"
    return f"role {name}: {done}{', password set' if password is not None else ''}"


def _ensure_database(conn: psycopg.Connection, database: str) -> str:
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [database]
    ).fetchone()
    names = (sql.Identifier(database), sql.Identifier(OWNER_ROLE))
    if row is None:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(*names))
        return f"database {database}: created, owned by {OWNER_ROLE}"
    if row[0] != OWNER_ROLE:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(*names))
        return f"database {database}: exists, owner changed from {row[0]} to {OWNER_ROLE}"
    return f"database {database}: exists, owned by {OWNER_ROLE}"


@contextmanager
def _translated(setting: str) -> Iterator[None]:
    """A refused administration statement as one line naming the setting."""
    try:
        yield
    except psycopg.Error as exc:
        # The primary message only: DETAIL lines can quote values.
        primary = exc.diag.message_primary or type(exc).__name__
        raise ConfigError(setting, f"{primary} [{exc.sqlstate or '?'}]") from None


def set_role_password(owner_url: str, role: str, password: str) -> None:
    """Give a role a login with this password as the owner (CREATEROLE), e.g. for hcrepo_app
    or hcrepo_auditor (which the migrations create without a login)."""
    with connect(owner_url, "owner URL", autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)) +
                     _password(conn, role, password))


def status(url: str, *, setting: str, source: Path | None = None) -> list[MigrationState]:
    """Every known migration, in order, and whether it is applied."""
    migrations = read_migrations(str(source or migrations_dir()))
    with _backend(url, setting) as backend:
        return [MigrationState(m.id, bool(backend.is_applied(m))) for m in migrations]


def apply(url: str, *, setting: str, source: Path | None = None) -> list[str]:
    """Apply every pending migration, each in its own transaction; return their ids."""
    migrations = read_migrations(str(source or migrations_dir()))
    with connect(url, setting) as conn:
        problems = _migrate_problems(conn)
    if problems:
        raise MigrationRefused(setting, "; ".join(problems) + "; nothing applied (hcrepo "
                               "bootstrap, run once as a superuser, sets the roles up)")
    with _backend(url, setting) as backend, backend.lock():
        pending = backend.to_apply(migrations)
        _run(backend.apply_one, pending)
        return [m.id for m in pending]


class RollbackPlan(NamedTuple):
    """What a rollback is about to do: the migrations, newest first, and the tables their
    rollback drops that may hold rows."""

    migrations: list[str]
    tables_with_rows: list[str]


def rollback(
    url: str, *, setting: str, count: int | None = 1, source: Path | None = None,
    confirm: Callable[[RollbackPlan], None] | None = None,
) -> list[str]:
    """Roll back the last `count` applied migrations (None: all); return their ids.

    `confirm` sees the plan before anything is rolled back, under the migration lock, and
    raises to stop it.
    """
    migrations = read_migrations(str(source or migrations_dir()))
    with _backend(url, setting) as backend, backend.lock():
        applied = list(backend.to_rollback(migrations))
        chosen = applied if count is None else applied[:count]
        if confirm is not None and chosen:
            tables = [table for m in chosen for table in _dropped_tables(m.path)]
            confirm(RollbackPlan([m.id for m in chosen], _with_rows(backend, tables)))
        _run(backend.rollback_one, chosen)
        return [m.id for m in chosen]


def _dropped_tables(path: str) -> list[str]:
    """The tables the DROP TABLE statements of a SQL migration's rollback file name."""
    rollback_file = Path(path).with_name(Path(path).stem + ".rollback.sql")
    if not rollback_file.is_file():
        return []
    return [
        ".".join(part.sval for part in name)
        for raw in parser.parse_sql(rollback_file.read_text())
        if isinstance(raw.stmt, ast.DropStmt)
        and raw.stmt.removeType == enums.ObjectType.OBJECT_TABLE
        for name in raw.stmt.objects or ()
    ]


def _with_rows(backend: Any, tables: list[str]) -> list[str]:
    # Row-level security hides rows from the owner without a clinic, so a count would say
    # "empty" about a full table: a table with any page on disk is taken to hold rows. A
    # partitioned table (the audit trail) has no pages of its own: its partitions count.
    with backend.connection.cursor() as cursor:  # yoyo's connection is in autocommit
        cursor.execute(
            "SELECT name FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, n) "
            "WHERE pg_relation_size(to_regclass(name)) + coalesce((SELECT sum(pg_relation_size("
            "p.relid)) FROM pg_partition_tree(to_regclass(name)) AS p), 0) > 0 ORDER BY n",
            [tables],
        )
        return [str(row[0]) for row in cursor.fetchall()]


_CAN_MIGRATE_SQL = """
SELECT current_user AS me, current_database() AS db,
       (SELECT pg_has_role(current_user, oid, 'USAGE') FROM pg_roles WHERE rolname = %(owner)s)
           AS owner_member,
       pg_has_role(current_user, d.datdba, 'USAGE') AS owns_db,
       has_database_privilege(current_database(), 'CREATE') AS creates_in_db,
       (SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace
        WHERE nspname = 'public') AS owns_public,
       EXISTS (SELECT FROM pg_extension WHERE extname = 'btree_gist') AS has_btree_gist,
       (SELECT bool_or(trusted) FROM pg_available_extension_versions
        WHERE name = 'btree_gist') AS btree_gist_trusted
FROM pg_database d WHERE d.datname = current_database()
"""


def _migrate_problems(conn: psycopg.Connection) -> list[str]:
    """What the connected role lacks for the shipped migrations, each as a short phrase."""
    me = _role(conn, None)
    facts = conn.cursor(row_factory=dict_row).execute(
        _CAN_MIGRATE_SQL, {"owner": OWNER_ROLE}
    ).fetchone()
    assert me is not None and facts is not None  # the connected role and database exist
    name, db, superuser = facts["me"], facts["db"], me["rolsuper"]
    missing = [role for role in (APP_ROLE, AUDITOR_ROLE) if _role(conn, role) is None]
    problems = []
    if facts["owner_member"] is None:
        problems.append(f"role {OWNER_ROLE} does not exist (the migrations' policies name it)")
    elif not facts["owner_member"]:
        problems.append(f"{name} is not {OWNER_ROLE} nor a member of it")
    if missing and not (superuser or me["rolcreaterole"]):
        roles = " and ".join(f"role {role}" for role in missing)
        problems.append(f"{roles} {'does' if len(missing) == 1 else 'do'} not exist and "
                        f"{name} lacks CREATEROLE")
    for role_name in (APP_ROLE, AUDITOR_ROLE):
        role = _role(conn, role_name)
        if role is not None and (unsafe := _unsafe_role(role_name, role, tuple(_UNSAFE))):
            problems.append(unsafe)
    if not facts["owns_db"]:
        problems.append(f"{name} does not own database {db}")
    elif not facts["creates_in_db"]:
        problems.append(f"{name} lacks CREATE on database {db}")
    if not facts["owns_public"]:
        problems.append(f"{name} does not own schema public")
    if not facts["has_btree_gist"] and facts["btree_gist_trusted"] is None:
        problems.append("extension btree_gist is not available on the server")
    elif not facts["has_btree_gist"] and not (facts["btree_gist_trusted"] or superuser):
        problems.append("extension btree_gist is not trusted here and needs a superuser")
    return problems


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


def _password(conn: psycopg.Connection, role: str, password: str) -> sql.Composable:
    # Hashed client-side (libpq, the server's algorithm) so the clear password never
    # reaches the server's statement log.
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode())
    return sql.SQL(" PASSWORD {}").format(sql.Literal(verifier.decode()))
