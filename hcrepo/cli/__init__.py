"""The `hcrepo` command: one module per subcommand (migrate, check, demo).

Errors a user can fix (settings, unreachable database, wrong credentials) print one line
naming the setting and exit 2; a failed migration prints one line and exits 1. Neither shows
a traceback: tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hcrepo.cli import check, demo, migrate
from hcrepo.errors import ConfigError, HcrepoError

Command = Callable[[argparse.Namespace], int]


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcrepo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in (migrate, check, demo):
        command.add(commands)
    return parser
