"""`hcrepo check`: every repository query prepared on a live database and compared with its
model (hcrepo.admin.check does the checking)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hcrepo.admin import check
from hcrepo.config import Settings

# The shipped domain is always checked; --module adds an application's own repositories.
DEFAULT_MODULES = ("hcrepo.healthcare",)


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check_parser = commands.add_parser(
        "check",
        help="prepare every repository query on a live database and compare it with its model",
        description="Connects through --database, else DATABASE_URL (the application role). "
        "Prints file:line: severity: message per finding; exits 1 on any error.",
    )
    check_parser.add_argument("--database", metavar="URL", help="application role URL")
    check_parser.add_argument(
        "--module", action="append", default=[], metavar="NAME",
        help="import NAME so that its repositories are checked too (repeatable)",
    )
    check_parser.set_defaults(command=lambda args: run(args.database, args.module))


def run(database: str | None, modules: Sequence[str]) -> int:
    """Print every finding as `file:line: severity: message`; 1 on any error."""
    if database is not None:
        url, setting = database, "--database"
    else:
        url, setting = Settings.load().database_url, "DATABASE_URL"
    classes = check.repositories(DEFAULT_MODULES + tuple(modules))
    findings = check.run_check(url, classes, setting=setting)
    cwd = Path.cwd()
    for finding in findings:
        path = Path(finding.path)
        shown = path.relative_to(cwd) if path.is_relative_to(cwd) else path
        print(str(finding._replace(path=str(shown))))
    errors = sum(f.severity == "error" for f in findings)
    queries = sum(len(cls.__plans__) for cls in classes)
    print(f"hcrepo check: {queries} queries, {errors} errors, {len(findings) - errors} warnings",
          file=sys.stderr)
    return 1 if errors else 0
