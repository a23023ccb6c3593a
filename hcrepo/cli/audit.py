"""`hcrepo audit {seal,digest,verify,trail}`: the write-audit chain and one patient's trail.

Roles: `seal` runs as the application role (DATABASE_URL: it may only call audit.seal);
`digest`, `verify` and `trail` run as hcrepo_auditor (HCREPO_AUDITOR_URL), whose every use
is logged in audit.auditor_log. `--database` replaces the URL of either.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

from hcrepo.admin.connect import connect
from hcrepo.compliance import auditor, digest, sealer
from hcrepo.compliance.trail import TrailEntry, patient_trail
from hcrepo.compliance.verify import verify
from hcrepo.config import AuditSettings, Settings
from hcrepo.errors import ConfigError

DESCRIPTION = """\
Seal the audit trail into its hash chain, sign the chain heads, verify the chain, or show
one patient's trail (who viewed and who changed the record, when, through which query).
digest, verify and trail connect as hcrepo_auditor through HCREPO_AUDITOR_URL; seal as
the application role through DATABASE_URL."""


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("audit", help="seal, sign, verify the audit trail; show a "
                                 "patient's trail", description=DESCRIPTION)
    actions = parser.add_subparsers(required=True, title="actions")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--database", metavar="URL", help="connect here instead")

    actions.add_parser(
        "seal", parents=[database], help="link committed audit rows into the chain (cron)",
        description="Link every committed, unsealed audit row into its clinic's chain and "
        "make the coming months' partitions; as the application role (DATABASE_URL).",
    ).set_defaults(command=_seal)
    actions.add_parser(
        "digest", parents=[database], help="print the chain heads, signed",
        description="Print each clinic chain's head (seq and hash) as JSON signed with "
        "HCREPO_AUDIT_DIGEST_KEY (HMAC-SHA256). Store it outside the database: verify "
        "--digest then detects a chain rewritten after it.",
    ).set_defaults(command=_digest)
    check = actions.add_parser(
        "verify", parents=[database], help="walk the chain and report the first broken link",
        description="Recompute every link from the audit rows; report each chain's first "
        "broken link as edited, deleted, inserted or (with --digest) rewritten. Exit 1 on "
        "any finding.",
    )
    check.add_argument("--clinic", type=_uuid, metavar="ID", help="one clinic's chain only")
    check.add_argument("--digest", type=Path, metavar="FILE",
                       help="a digest printed by `hcrepo audit digest`")
    check.set_defaults(command=_verify)
    trail = actions.add_parser(
        "trail", parents=[database], help="who viewed and who changed one patient",
        description="Every view (the PHI access log) and change (the audit trail) of one "
        "patient, oldest first: time, viewed/changed, actor, clinic, staff role, query or "
        "change, and for a view where it was served.",
    )
    trail.add_argument("--patient", type=_uuid, required=True, metavar="ID")
    trail.add_argument("--since", type=_date, metavar="DATE", help="YYYY-MM-DD (UTC)")
    trail.set_defaults(command=_trail)


def _seal(args: argparse.Namespace) -> int:
    url, setting = (args.database, "--database") if args.database else (
        Settings.load().database_url, "DATABASE_URL")
    with connect(url, setting, autocommit=True) as conn:
        made = sealer.ensure_partitions(conn)
        sealed = sealer.seal_pending(conn)
    print(f"sealed {sealed} audit rows; {made} partitions made")
    return 0


def _digest(args: argparse.Namespace) -> int:
    key = AuditSettings.load().require("digest_key").encode()
    url, setting = _auditor(args)
    with auditor.session(url, setting, "digest", {}) as conn:
        print(json.dumps(digest.make(conn, key), indent=2, sort_keys=True))
    return 0


def _verify(args: argparse.Namespace) -> int:
    heads = None
    if args.digest is not None:
        key = AuditSettings.load().require("digest_key").encode()
        heads = digest.signed_heads(_read_digest(args.digest), key)
    url, setting = _auditor(args)
    logged = {"clinic": str(args.clinic) if args.clinic else None,
              "digest": args.digest is not None}
    with auditor.session(url, setting, "verify", logged) as conn:
        result = verify(conn, clinic=args.clinic, heads=heads)
    for found in result.breaks:
        print(found)
    state = "ok" if result.ok else f"{len(result.breaks)} broken"
    print(f"verified {result.links} links in {result.clinics} chains"
          f"{' against the digest' if heads is not None else ''}: {state}")
    return 0 if result.ok else 1


def _trail(args: argparse.Namespace) -> int:
    url, setting = _auditor(args)
    for entry in patient_trail(url, args.patient, args.since, setting=setting):
        print(_line(entry))
    return 0


def _line(entry: TrailEntry) -> str:
    parts = [entry.at.isoformat(), entry.kind, f"actor={entry.actor_id or '-'}",
             f"clinic={entry.clinic_id}", f"role={entry.staff_role or '-'}", entry.what]
    if entry.columns:
        parts.append(f"[{', '.join(entry.columns)}]")
    if entry.source:
        parts.append(f"via {entry.source}")
    if entry.emergency_reason:
        parts.append("emergency")
    return "  ".join(parts)


def _auditor(args: argparse.Namespace) -> tuple[str, str]:
    if args.database:
        return args.database, "--database"
    return AuditSettings.load().require("auditor_url"), "HCREPO_AUDITOR_URL"


def _read_digest(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError("--digest", f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError("--digest", f"{path} is not JSON") from None


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
