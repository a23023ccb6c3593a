"""`hcrepo retention --dry-run | --apply`: drop the audit trail's and the access log's
monthly partitions that lie wholly before their retention period, as the owner role."""

from __future__ import annotations

import argparse
import sys

from hcrepo.compliance import retention
from hcrepo.config import AuditSettings
from hcrepo.errors import ConfigError

DESCRIPTION = """\
List (--dry-run) or drop (--apply) the monthly partitions of the audit trail older than
AUDIT_RETENTION_DAYS and of the PHI access log older than ACCESS_LOG_RETENTION_DAYS (both
2555 days by default). Only whole partitions that end before the period are dropped; every
purge is recorded in the audit trail, and the coming months' partitions are made. Connects
as hcrepo_owner through HCREPO_OWNER_URL. --apply asks first on a terminal and is refused
elsewhere unless --yes is given."""


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("retention", help="drop audit partitions past retention",
                                 description=DESCRIPTION)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="list what would be dropped")
    mode.add_argument("--apply", action="store_true", help="drop it")
    parser.add_argument("--yes", action="store_true", help="do not ask before dropping")
    parser.add_argument("--database", metavar="URL", help="the owner's URL (instead of "
                        "HCREPO_OWNER_URL)")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    settings = AuditSettings.load()
    url, setting = (args.database, "--database") if args.database else (
        settings.require("owner_url"), "HCREPO_OWNER_URL")
    cutoffs = {"changes": retention.cutoff(settings.audit_retention_days),
               "access_log": retention.cutoff(settings.access_log_retention_days)}
    planned = retention.purge(url, cutoffs, apply=False, setting=setting)
    for partition in planned:
        print(f"{'drop' if args.apply else 'would drop'} {partition}")
    if not planned:
        print("nothing past retention")
        return 0
    if args.dry_run:
        return 0
    if not args.yes:
        _confirm(len(planned))
    dropped = retention.purge(url, cutoffs, apply=True, setting=setting)
    print(f"dropped {len(dropped)} partitions")
    return 0


def _confirm(count: int) -> None:
    what = f"drop {count} audit partitions"
    if sys.stdin is None or not sys.stdin.isatty():
        raise ConfigError("retention", f"would {what}: give --yes to confirm (stdin is not a "
                                       "terminal to ask); nothing dropped")
    print(f"hcrepo: this will {what}. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise ConfigError("retention", "not confirmed; nothing dropped")
