"""`hcrepo bootstrap` and `hcrepo migrate apply` on a cluster of the suite's own, the way an
operator runs them on a PostgreSQL that is already running.

Roles are cluster-wide and these tests create, refuse and adopt hcrepo's two roles, so they
run on a server of their own (not the session's primary), emptied after every test.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from hcrepo import Database, Settings
from hcrepo.admin import migrate
from hcrepo.healthcare import ClinicRepository, PatientRepository
from hcrepo.testing import PostgresServer
from tests.support.cli import assert_one_line, hcrepo

OWNER_PW = "owner-pw-0d6f"
APP_PW = "app-pw-7c1e"
PASSWORDS = {"HCREPO_OWNER_PASSWORD": OWNER_PW, "HCREPO_APP_PASSWORD": APP_PW}
MIGRATIONS = [
    path.stem for path in sorted(migrate.migrations_dir().glob("*.sql"))
    if not path.name.endswith(".rollback.sql")
]
APPLIED = "".join(f"applied {name}\n" for name in MIGRATIONS)
EXTRA_ROLES = ("team_owner", "cloud_admin")
ACTOR = uuid.UUID("00000000-0000-4000-8000-0000000b0075")


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def cluster(own_server: PostgresServer) -> Iterator[PostgresServer]:
    """The module's server with no hcrepo role and no database but postgres and templates;
    emptied again after the test."""
    yield own_server
    with psycopg.connect(own_server.superuser_url, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname <> 'postgres' AND NOT datistemplate"
        ).fetchall():
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        for role in (migrate.AUDITOR_ROLE, migrate.APP_ROLE, migrate.OWNER_ROLE, *EXTRA_ROLES):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def superuser(server: PostgresServer, statement: str, dbname: str = "postgres") -> Any:
    url = server.url(user="postgres", password=server.superuser_password, dbname=dbname)
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else None


def exported(stdout: str, **passwords: str) -> dict[str, str]:
    """The `export NAME="URL"` lines bootstrap printed, with ${VAR} expanded as a shell would."""
    found = dict(re.findall(r'^export (\w+)="(.*)"$', stdout, re.MULTILINE))
    return {
        name: re.sub(r"\$\{(\w+)\}", lambda m: passwords[m.group(1)], url)
        for name, url in found.items()
    }


def role_flags(server: PostgresServer, role: str) -> tuple[bool, ...]:
    rows = superuser(server, "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreatedb, "
                             "rolcreaterole, rolreplication FROM pg_roles "
                             f"WHERE rolname = '{role}'")
    return tuple(rows[0])


def nothing_applied(server: PostgresServer, dbname: str) -> bool:
    """No yoyo table, no table, no extension: the database as the superuser made it."""
    rows = superuser(server, "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = "
                             "'public'::regnamespace), (SELECT count(*) FROM pg_extension "
                             "WHERE extname = 'btree_gist')", dbname)
    return bool(rows[0] == (0, 0))


def test_bootstrap_then_migrate_then_the_application_connects(cluster: PostgresServer) -> None:
    su = cluster.superuser_url
    first = hcrepo("bootstrap", "--superuser-url", su, env=PASSWORDS)
    host = f"{cluster.host}:{cluster.port}"
    exports = (
        f'export HCREPO_OWNER_URL="postgresql://hcrepo_owner:${{HCREPO_OWNER_PASSWORD}}@{host}/hcrepo"\n'
        f'export DATABASE_URL="postgresql://hcrepo_app:${{HCREPO_APP_PASSWORD}}@{host}/hcrepo"\n'
    )
    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout == (
        "# role hcrepo_owner: created, password set\n"
        "# role hcrepo_app: created, password set\n"
        "# role hcrepo_auditor: created without a login\n"
        "# database hcrepo: created, owned by hcrepo_owner\n" + exports
    )
    again = hcrepo("bootstrap", "--superuser-url", su, env=PASSWORDS)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout == (
        "# role hcrepo_owner: exists, kept, password set\n"
        "# role hcrepo_app: exists, kept, password set\n"
        "# role hcrepo_auditor: exists, kept\n"
        "# database hcrepo: exists, owned by hcrepo_owner\n" + exports
    )
    assert OWNER_PW not in first.stdout + again.stdout and APP_PW not in first.stdout
    # login, super, bypassrls, createdb, createrole, replication
    assert role_flags(cluster, "hcrepo_app") == (True, False, False, False, False, False)
    assert role_flags(cluster, "hcrepo_owner") == (True, False, False, False, True, False)

    urls = exported(first.stdout, **PASSWORDS)
    applied = hcrepo("migrate", "apply", env={"HCREPO_OWNER_URL": urls["HCREPO_OWNER_URL"]})
    assert (applied.returncode, applied.stdout, applied.stderr) == (0, APPLIED, "")

    with Database(Settings(database_url=urls["DATABASE_URL"], pool_min=1, pool_max=2)) as db:
        with db.context(actor_id=ACTOR):
            clinic = ClinicRepository(db).create(name="Bootstrap Clinic")
        with db.context(clinic_id=clinic.id):
            assert PatientRepository(db).count() == 0
            assert ClinicRepository(db).get(id=clinic.id) == clinic


def test_a_managed_service_administrator_is_enough(cluster: PostgresServer) -> None:
    """Amazon RDS's master user and Cloud SQL's admin have CREATEROLE and CREATEDB, not
    SUPERUSER: bootstrap works as such a role, twice, and migrate after it."""
    superuser(cluster, "CREATE ROLE cloud_admin LOGIN CREATEROLE CREATEDB PASSWORD 'admin-pw'")
    admin_url = cluster.url(user="cloud_admin", password="admin-pw")
    for _ in range(2):
        result = hcrepo("bootstrap", "--superuser-url", admin_url, "--database", "clinic",
                        env=PASSWORDS)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert "# database clinic: exists, owned by hcrepo_owner\n" in result.stdout
    urls = exported(result.stdout, **PASSWORDS)
    applied = hcrepo("migrate", "apply", "--database", urls["HCREPO_OWNER_URL"])
    assert (applied.returncode, applied.stdout, applied.stderr) == (0, APPLIED, "")
    with psycopg.connect(urls["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM clinics").fetchone() == (0,)


def test_migrate_as_the_teams_own_role_is_refused_up_front_until_bootstrap(
    cluster: PostgresServer,
) -> None:
    superuser(cluster, "CREATE ROLE team_owner LOGIN PASSWORD 'team-pw'")
    superuser(cluster, "CREATE DATABASE clinic OWNER team_owner")
    team_url = cluster.url(user="team_owner", password="team-pw", dbname="clinic")
    refused = hcrepo("migrate", "apply", env={"HCREPO_OWNER_URL": team_url})
    assert (refused.returncode, refused.stdout) == (2, "")
    assert_one_line(
        refused.stderr, starts="hcrepo: HCREPO_OWNER_URL: role hcrepo_owner does not exist "
        "(the migrations' policies name it); role hcrepo_app and role hcrepo_auditor do not "
        "exist and team_owner lacks CREATEROLE; nothing applied", contains="hcrepo bootstrap",
    )
    assert nothing_applied(cluster, "clinic")

    done = hcrepo("bootstrap", "--superuser-url", cluster.superuser_url, "--database",
                  "clinic", env=PASSWORDS)
    assert done.returncode == 0, done.stderr
    assert "# database clinic: exists, owner changed from team_owner to hcrepo_owner\n" in (
        done.stdout)
    urls = exported(done.stdout, **PASSWORDS)
    applied = hcrepo("migrate", "apply", env={"HCREPO_OWNER_URL": urls["HCREPO_OWNER_URL"]})
    assert (applied.returncode, applied.stdout, applied.stderr) == (0, APPLIED, "")


def test_an_owner_without_createrole_is_adopted_and_migrate_needs_none(
    cluster: PostgresServer,
) -> None:
    superuser(cluster, "CREATE ROLE hcrepo_owner LOGIN PASSWORD 'old-pw'")
    superuser(cluster, "CREATE DATABASE clinic OWNER hcrepo_owner")
    old_url = cluster.url(user="hcrepo_owner", password="old-pw", dbname="clinic")
    refused = hcrepo("migrate", "apply", "--database", old_url)
    assert refused.returncode == 2
    assert_one_line(refused.stderr, starts="hcrepo: --database: role hcrepo_app and role "
                    "hcrepo_auditor do not exist and hcrepo_owner lacks CREATEROLE; nothing "
                    "applied")
    assert nothing_applied(cluster, "clinic")

    done = hcrepo("bootstrap", "--superuser-url", cluster.superuser_url, "--database",
                  "clinic", env=PASSWORDS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# role hcrepo_owner: exists, kept, password set\n"
                                  "# role hcrepo_app: created, password set\n")
    assert role_flags(cluster, "hcrepo_owner") == (True, False, False, False, False, False)
    urls = exported(done.stdout, **PASSWORDS)
    applied = hcrepo("migrate", "apply", "--database", urls["HCREPO_OWNER_URL"])
    assert (applied.returncode, applied.stdout, applied.stderr) == (0, APPLIED, "")


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("CREATE ROLE hcrepo_app LOGIN BYPASSRLS",
         "role hcrepo_app exists with BYPASSRLS, which defeats tenant isolation (as a "
         "superuser: ALTER ROLE hcrepo_app NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB "
         "NOREPLICATION); nothing changed"),
        ("CREATE ROLE hcrepo_app LOGIN CREATEDB CREATEROLE",
         "role hcrepo_app exists with CREATEROLE, CREATEDB, which defeats tenant isolation"),
        ("CREATE ROLE hcrepo_owner LOGIN SUPERUSER",
         "role hcrepo_owner exists with SUPERUSER, which defeats tenant isolation (as a "
         "superuser: ALTER ROLE hcrepo_owner NOSUPERUSER NOBYPASSRLS); nothing changed"),
    ],
)
def test_bootstrap_refuses_a_role_that_would_bypass_row_level_security(
    cluster: PostgresServer, statement: str, problem: str
) -> None:
    superuser(cluster, statement)
    before = superuser(cluster, "SELECT rolname FROM pg_roles ORDER BY 1")
    result = hcrepo("bootstrap", "--superuser-url", cluster.superuser_url, env=PASSWORDS)
    assert (result.returncode, result.stdout) == (2, "")
    assert_one_line(result.stderr, starts="hcrepo: --superuser-url: ", contains=problem)
    assert superuser(cluster, "SELECT rolname FROM pg_roles ORDER BY 1") == before
    assert superuser(cluster, "SELECT datname FROM pg_database WHERE datname = 'hcrepo'") == []


def test_bootstrap_as_a_role_without_privileges_is_refused(cluster: PostgresServer) -> None:
    superuser(cluster, "CREATE ROLE team_owner LOGIN PASSWORD 'team-pw'")
    url = cluster.url(user="team_owner", password="team-pw")
    result = hcrepo("bootstrap", "--superuser-url", url, env=PASSWORDS)
    assert (result.returncode, result.stdout) == (2, "")
    assert_one_line(result.stderr, starts="hcrepo: --superuser-url: team_owner is neither a "
                    "superuser nor has CREATEROLE; database hcrepo does not exist and "
                    "team_owner lacks CREATEDB; nothing changed")
    assert superuser(cluster, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'hcrepo%'") == [
        (0,)]
