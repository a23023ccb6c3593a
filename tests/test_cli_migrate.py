"""`hcrepo migrate` as a user runs it: a subprocess with a clean environment."""

from __future__ import annotations

import os
import pty
from importlib import metadata
from pathlib import Path
from typing import Protocol

import psycopg
import pytest

from hcrepo.admin import migrate
from hcrepo.cli import main
from hcrepo.testing import PostgresServer, free_port
from tests.plugins.database import OWNER_PASSWORD, FreshDatabase
from tests.support.cli import assert_one_line, hcrepo

MIGRATIONS = sorted(
    path.stem for path in migrate.migrations_dir().glob("*.sql")
    if not path.name.endswith(".rollback.sql")
)


def listing(*applied: str) -> str:
    return "".join(
        f"{'applied' if name in applied else 'pending'}  {name}\n" for name in MIGRATIONS
    )


class InProcess(Protocol):
    def __call__(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]: ...


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    """`main()` in this process (fast), with only the given connection settings set."""

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        with monkeypatch.context() as patch:
            for name in ("DATABASE_URL", "HCREPO_OWNER_URL"):
                patch.delenv(name, raising=False)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_python_m_hcrepo_runs_the_command(fresh_database: FreshDatabase) -> None:
    result = hcrepo("migrate", "list", "--database", fresh_database().owner_url)
    assert (result.returncode, result.stdout, result.stderr) == (0, listing(), "")


def test_list_apply_rollback_with_database_option(
    fresh_database: FreshDatabase, cli: InProcess
) -> None:
    url = fresh_database().owner_url

    assert cli("migrate", "list", "--database", url) == (0, listing(), "")
    applied = "".join(f"applied {name}\n" for name in MIGRATIONS)
    assert cli("migrate", "apply", "--database", url) == (0, applied, "")
    assert cli("migrate", "list", "--database", url) == (0, listing(*MIGRATIONS), "")
    assert cli("migrate", "apply", "--database", url) == (0, "nothing to apply\n", "")

    one = f"rolled back {MIGRATIONS[-1]}\n"
    assert cli("migrate", "rollback", "--database", url) == (0, one, "")
    two = f"rolled back {MIGRATIONS[-2]}\nrolled back {MIGRATIONS[-3]}\n"
    assert cli("migrate", "rollback", "--count", "2", "--database", url) == (0, two, "")
    assert cli("migrate", "list", "--database", url) == (0, listing(*MIGRATIONS[:-3]), "")
    rest = "".join(f"rolled back {name}\n" for name in reversed(MIGRATIONS[:-3]))
    assert cli("migrate", "rollback", "--all", "--yes", "--database", url) == (0, rest, "")
    nothing = "nothing to roll back\n"
    assert cli("migrate", "rollback", "--all", "--database", url) == (0, nothing, "")


def test_owner_url_from_the_environment_wins_over_database_url(
    fresh_database: FreshDatabase, cli: InProcess
) -> None:
    url = fresh_database().owner_url
    # DATABASE_URL would fail (closed port): only HCREPO_OWNER_URL may be used.
    closed = f"postgresql://hcrepo_app:x@127.0.0.1:{free_port()}/x"
    status, _, err = cli("migrate", "apply", env={"HCREPO_OWNER_URL": url, "DATABASE_URL": closed})
    assert (status, err) == (0, "")
    assert cli("migrate", "list", env={"HCREPO_OWNER_URL": url}) == (0, listing(*MIGRATIONS), "")


def test_database_url_is_the_fallback(fresh_database: FreshDatabase, cli: InProcess) -> None:
    url = fresh_database().owner_url
    assert cli("migrate", "list", env={"DATABASE_URL": url}) == (0, listing(), "")


def test_a_failing_migration_prints_one_line_and_exits_1(
    fresh_database: FreshDatabase, cli: InProcess, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = fresh_database().owner_url
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE t (id int);\nSELECT 1 / 0;\n")
    monkeypatch.setattr(migrate, "migrations_dir", lambda: tmp_path)
    status, out, err = cli("migrate", "apply", "--database", url)
    assert (status, out) == (1, "")
    assert err == "hcrepo: migration 0001_broken failed [22012]: division by zero\n"


def _bad(pg_primary: PostgresServer, case: str) -> tuple[list[str], dict[str, str], str, str]:
    """(command line, environment, setting named, cause) for one kind of bad input."""
    secret = "s3cret-Pa55"
    wrong = f"postgresql://hcrepo_owner:{secret}@127.0.0.1:{pg_primary.port}/postgres"
    closed = f"postgresql://hcrepo_owner:{secret}@127.0.0.1:{free_port()}/postgres"
    return {
        "no url": (["list"], {}, "DATABASE_URL", "is required but not set"),
        "empty url": (["apply"], {"DATABASE_URL": ""}, "DATABASE_URL", "must not be empty"),
        "malformed url": (
            ["rollback"], {"DATABASE_URL": "nonsense here"}, "DATABASE_URL", "not a valid"
        ),
        "malformed option": (["list", "--database", "nonsense here"], {}, "--database",
                             "not a valid"),
        "closed port, option": (["apply", "--database", closed], {}, "--database", "refused"),
        "closed port, env": (["list"], {"DATABASE_URL": closed}, "DATABASE_URL", "refused"),
        "wrong password, owner env": (
            ["apply"], {"HCREPO_OWNER_URL": wrong, "DATABASE_URL": closed}, "HCREPO_OWNER_URL",
            "password authentication failed",
        ),
        "wrong password, option": (
            ["rollback", "--all", "--database", wrong], {}, "--database",
            "password authentication failed",
        ),
    }[case]


@pytest.mark.parametrize(
    "case",
    ["no url", "empty url", "malformed url", "malformed option", "closed port, option",
     "closed port, env", "wrong password, owner env", "wrong password, option"],
)
def test_bad_connection_settings_give_one_line_and_exit_2(
    case: str, pg_primary: PostgresServer
) -> None:
    args, env, setting, cause = _bad(pg_primary, case)
    result = hcrepo("migrate", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line(result.stderr, starts=f"hcrepo: {setting}: ", contains=cause)
    assert "s3cret-Pa55" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["migrate"], ["migrate", "upgrade"],
     ["migrate", "rollback", "--count", "0"], ["migrate", "rollback", "--count", "x"],
     ["migrate", "rollback", "--count", "1", "--all"]],
)
def test_bad_arguments_exit_2_with_one_line_pointing_at_help(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(err, starts="hcrepo", contains=" --help')")


def test_owner_password_is_never_echoed(fresh_database: FreshDatabase, cli: InProcess) -> None:
    url = fresh_database().owner_url
    status, out, err = cli("migrate", "apply", "--database", url)
    assert status == 0
    assert OWNER_PASSWORD not in out + err


def applied_now(url: str) -> list[str]:
    return [state.id for state in migrate.status(url, setting="owner URL") if state.applied]


def test_rollback_all_without_yes_is_refused_when_no_terminal_can_ask(
    fresh_database: FreshDatabase,
) -> None:
    url = fresh_database().owner_url
    migrate.apply(url, setting="owner URL")
    result = hcrepo("migrate", "rollback", "--all", "--database", url)
    assert (result.returncode, result.stdout) == (2, "")
    newest_first = ", ".join(reversed(MIGRATIONS))
    assert_one_line(result.stderr, starts=f"hcrepo: migrate rollback: would roll back "
                    f"{newest_first}: give --yes to confirm", contains="nothing rolled back")
    assert applied_now(url) == MIGRATIONS


def test_a_rollback_that_drops_a_table_holding_rows_needs_yes(
    fresh_database: FreshDatabase,
) -> None:
    db = fresh_database()
    migrate.apply(db.owner_url, setting="owner URL")
    with psycopg.connect(db.superuser_url) as conn:
        conn.execute("INSERT INTO clinics (name) VALUES ('Rollback Clinic')")
    # The clinical tables 0003 drops, and those of every later migration, are empty: no
    # question.
    later = str(len(MIGRATIONS) - 2)
    result = hcrepo("migrate", "rollback", "--count", later, "--database", db.owner_url)
    assert (result.returncode, result.stderr) == (0, "")
    assert applied_now(db.owner_url) == MIGRATIONS[:2]

    result = hcrepo("migrate", "rollback", "--database", db.owner_url)
    assert (result.returncode, result.stdout) == (2, "")
    assert_one_line(result.stderr, starts="hcrepo: migrate rollback: would roll back "
                    "0002_directory, dropping tables that may hold rows (clinics): give --yes")
    assert applied_now(db.owner_url) == MIGRATIONS[:2]
    with psycopg.connect(db.superuser_url) as conn:
        assert conn.execute("SELECT count(*) FROM clinics").fetchone() == (1,)

    result = hcrepo("migrate", "rollback", "--yes", "--database", db.owner_url)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "rolled back 0002_directory\n", "")
    assert applied_now(db.owner_url) == MIGRATIONS[:1]


@pytest.mark.parametrize(("answer", "status"), [("n", 2), ("", 2), ("y", 0)])
def test_a_terminal_is_asked_before_rolling_back_everything(
    fresh_database: FreshDatabase, answer: str, status: int
) -> None:
    url = fresh_database().owner_url
    migrate.apply(url, setting="owner URL")
    terminal, child_side = pty.openpty()
    try:
        # Typed ahead: the terminal holds the line until the command reads it.
        os.write(terminal, f"{answer}\n".encode())
        result = hcrepo("migrate", "rollback", "--all", "--database", url, stdin=child_side)
    finally:
        os.close(terminal)
        os.close(child_side)
    assert result.returncode == status
    assert result.stderr.startswith(f"hcrepo: this will roll back {MIGRATIONS[-1]}, ")
    assert "Continue? [y/N] " in result.stderr
    if status:
        assert result.stdout == ""
        assert result.stderr.endswith("hcrepo: migrate rollback: not confirmed; nothing rolled "
                                      "back\n")
        assert applied_now(url) == MIGRATIONS
    else:
        assert result.stdout == "".join(f"rolled back {m}\n" for m in reversed(MIGRATIONS))
        assert applied_now(url) == []


def test_version_comes_from_the_package_metadata() -> None:
    result = hcrepo("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"hcrepo {metadata.version('hcrepo')}\n", "")


def test_help_is_written_for_users_and_lists_the_actions() -> None:
    top = hcrepo("--help").stdout
    assert top.startswith("usage: hcrepo [-h] [--version]\n"
                          "              {bootstrap,migrate,check,keys,audit,retention,demo} ...")
    assert "one module per subcommand" not in top
    assert "hcrepo bootstrap --superuser-url" in top and "exit status" in top
    assert hcrepo("migrate", "--help").stdout.startswith(
        "usage: hcrepo migrate [-h] {apply,rollback,list} ...")
    rollback = hcrepo("migrate", "rollback", "--help").stdout
    assert "--yes" in rollback and "asks for confirmation" in rollback
