"""`hcrepo migrate apply|rollback|list`: the schema migrations, as the owner role."""

from __future__ import annotations

import argparse
import os

from hcrepo.admin import migrate
from hcrepo.config import Settings


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate_parser = commands.add_parser(
        "migrate",
        help="apply, roll back or list schema migrations (as the owner role)",
        description="Connects through --database, else HCREPO_OWNER_URL, else DATABASE_URL.",
    )
    actions = migrate_parser.add_subparsers(required=True, metavar="ACTION")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--database", metavar="URL", help="owner role URL (overrides env)")

    actions.add_parser("apply", parents=[database], help="apply pending migrations").set_defaults(
        command=_migrate_apply
    )
    actions.add_parser("list", parents=[database], help="list migrations").set_defaults(
        command=_migrate_list
    )
    rollback = actions.add_parser(
        "rollback", parents=[database], help="roll back the last migration (or --count / --all)"
    )
    how_many = rollback.add_mutually_exclusive_group()
    # No default here: argparse cannot tell "--count 1" from an omitted --count otherwise,
    # and would let "--count 1 --all" through.
    how_many.add_argument("--count", type=_positive, metavar="N", help="how many (default 1)")
    how_many.add_argument("--all", action="store_true", help="roll back every migration")
    rollback.set_defaults(command=_migrate_rollback)


def _migrate_apply(args: argparse.Namespace) -> int:
    url, setting = _migration_target(args.database)
    applied = migrate.apply(url, setting=setting)
    for migration_id in applied:
        print(f"applied {migration_id}")
    if not applied:
        print("nothing to apply")
    return 0


def _migrate_rollback(args: argparse.Namespace) -> int:
    url, setting = _migration_target(args.database)
    undone = migrate.rollback(url, setting=setting, count=None if args.all else args.count or 1)
    for migration_id in undone:
        print(f"rolled back {migration_id}")
    if not undone:
        print("nothing to roll back")
    return 0


def _migrate_list(args: argparse.Namespace) -> int:
    url, setting = _migration_target(args.database)
    for state in migrate.status(url, setting=setting):
        print(f"{'applied' if state.applied else 'pending'}  {state.id}")
    return 0


def _migration_target(database: str | None) -> tuple[str, str]:
    """The owner URL and the name of the setting it came from (for error messages)."""
    if database is not None:
        return database, "--database"
    overrides = {}
    if not os.environ.get("DATABASE_URL") and os.environ.get("HCREPO_OWNER_URL"):
        # A migration job may hold only the owner's URL; do not demand the application's too.
        overrides["database_url"] = os.environ["HCREPO_OWNER_URL"]
    settings = Settings.load(**overrides)
    return settings.migration_url, "HCREPO_OWNER_URL" if settings.owner_url else "DATABASE_URL"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value
