"""The `hcrepo` command: one module per subcommand (bootstrap, migrate, check, keys, audit,
retention, demo).

Errors a user can fix (settings, arguments, unreachable database, wrong credentials, roles
that lack a privilege, a destructive step not confirmed) print one line naming the setting
or option and exit 2; a failed migration or check exits 1. Neither shows a traceback:
tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import NoReturn

from hcrepo.cli import audit, bootstrap, check, demo, keys, migrate, retention
from hcrepo.errors import ConfigError, HcrepoError

Command = Callable[[argparse.Namespace], int]

DESCRIPTION = """\
Set up and maintain the PostgreSQL database behind hcrepo: create its roles, apply its
schema migrations, check an application's queries against the live schema, rotate the
keys of encrypted columns, and keep, verify and read its audit trail."""

EPILOG = """\
first deployment on a PostgreSQL that is already running (docs/deploying.md):
  export HCREPO_OWNER_PASSWORD=... HCREPO_APP_PASSWORD=...
  hcrepo bootstrap --superuser-url postgresql://postgres@db.example.com/postgres
  export HCREPO_OWNER_URL=... DATABASE_URL=...     (the two lines bootstrap prints)
  hcrepo migrate apply

exit status: 0 done; 1 a migration or a check failed; 2 something to fix first (a
setting, an argument, a missing privilege, a destructive step not confirmed), said in one
line on stderr.
"""


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except ConfigError as exc:
        print(f"hcrepo: {exc}", file=sys.stderr)
        return 2
    except HcrepoError as exc:
        print(f"hcrepo: {exc}", file=sys.stderr)
        return 1


def version() -> str:
    try:
        return metadata.version("hcrepo")
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hcrepo", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hcrepo {version()}")
    commands = parser.add_subparsers(required=True, title="commands")
    for command in (bootstrap, migrate, check, keys, audit, retention, demo):
        command.add(commands)
    return parser
