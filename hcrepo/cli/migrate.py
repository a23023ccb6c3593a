"""`hcrepo migrate {apply,rollback,list}`: the schema migrations, as the owner role."""

from __future__ import annotations

import argparse
import os
import sys

from hcrepo.admin import migrate
from hcrepo.config import Settings
from hcrepo.errors import ConfigError

DESCRIPTION = f"""\
Apply, roll back or list hcrepo's schema migrations, connected as {migrate.OWNER_ROLE}
(see `hcrepo bootstrap`). The URL comes from --database, else HCREPO_OWNER_URL, else
DATABASE_URL."""

ROLLBACK_DESCRIPTION = """\
Roll back the last applied migration, the last N (--count) or all of them (--all).
Rolling back drops what the migrations created: --all, and any rollback that drops a
table that may hold rows, asks for confirmation on a terminal and is refused elsewhere
unless --yes is given."""


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate_parser = commands.add_parser(
        "migrate", help=f"apply, roll back or list schema migrations (as {migrate.OWNER_ROLE})",
        description=DESCRIPTION,
    )
    actions = migrate_parser.add_subparsers(required=True, title="actions")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--database", metavar="URL",
                          help=f"{migrate.OWNER_ROLE}'s URL (instead of HCREPO_OWNER_URL)")

    actions.add_parser(
        "apply", parents=[database], help="apply every pending migration",
        description="Apply every pending migration, each in its own transaction. The role is "
        "checked first: when it lacks something the migrations need, one line says what and "
        "nothing is applied.",
    ).set_defaults(command=_migrate_apply)
    rollback = actions.add_parser(
        "rollback", parents=[database], help="roll back the last migration (or --count N, --all)",
        description=ROLLBACK_DESCRIPTION,
    )
    how_many = rollback.add_mutually_exclusive_group()
    # No default here: argparse cannot tell "--count 1" from an omitted --count otherwise,
    # and would let "--count 1 --all" through.
    how_many.add_argument("--count", type=positive, metavar="N", help="how many (default 1)")
    how_many.add_argument("--all", action="store_true", help="roll back every migration")
    rollback.add_argument("--yes", action="store_true",
                          help="do not ask before dropping tables or rolling back everything")
    rollback.set_defaults(command=_migrate_rollback)
    actions.add_parser(
        "list", parents=[database], help="list migrations, applied or pending",
        description="List every migration in order, applied or pending.",
    ).set_defaults(command=_migrate_list)


def _migrate_apply(args: argparse.Namespace) -> int:
    url, setting = migration_target(args.database)
    applied = migrate.apply(url, setting=setting)
    for migration_id in applied:
        print(f"applied {migration_id}")
    if not applied:
        print("nothing to apply")
    return 0


def _migrate_rollback(args: argparse.Namespace) -> int:
    url, setting = migration_target(args.database)
    undone = migrate.rollback(
        url, setting=setting, count=None if args.all else args.count or 1,
        confirm=None if args.yes else lambda plan: _confirm(plan, everything=args.all),
    )
    for migration_id in undone:
        print(f"rolled back {migration_id}")
    if not undone:
        print("nothing to roll back")
    return 0


def _confirm(plan: migrate.RollbackPlan, *, everything: bool) -> None:
    """Ask before a rollback of everything or one that drops tables that may hold rows."""
    if not everything and not plan.tables_with_rows:
        return
    what = f"roll back {', '.join(plan.migrations)}"
    if plan.tables_with_rows:
        what += f", dropping tables that may hold rows ({', '.join(plan.tables_with_rows)})"
    if sys.stdin is None or not sys.stdin.isatty():
        raise ConfigError("migrate rollback", f"would {what}: give --yes to confirm (stdin "
                                              "is not a terminal to ask); nothing rolled back")
    print(f"hcrepo: this will {what}. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise ConfigError("migrate rollback", "not confirmed; nothing rolled back")


def _migrate_list(args: argparse.Namespace) -> int:
    url, setting = migration_target(args.database)
    for state in migrate.status(url, setting=setting):
        print(f"{'applied' if state.applied else 'pending'}  {state.id}")
    return 0


def migration_target(database: str | None) -> tuple[str, str]:
    """The owner URL and the name of the setting it came from (for error messages)."""
    if database is not None:
        return database, "--database"
    overrides = {}
    if not os.environ.get("DATABASE_URL") and os.environ.get("HCREPO_OWNER_URL"):
        # A migration job may hold only the owner's URL; do not demand the application's too.
        overrides["database_url"] = os.environ["HCREPO_OWNER_URL"]
    try:
        settings = Settings.load(**overrides)
    except ConfigError as exc:
        if overrides and exc.setting == "DATABASE_URL":  # the stand-in was refused
            raise ConfigError("HCREPO_OWNER_URL", exc.problem) from None
        raise
    return settings.migration_url, "HCREPO_OWNER_URL" if settings.owner_url else "DATABASE_URL"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value
