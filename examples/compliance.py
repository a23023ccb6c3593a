"""Compliance tasks as an application runs them: a clinician's break-glass read with the hook
that pages the privacy officer, and one patient's trail for the privacy officer.

    python -m examples.compliance trail PATIENT_ID [--since 2026-01-01]

prints who viewed and who changed the patient, in time order, as the `hcrepo_auditor` role
(`HCREPO_AUDITOR_URL`). Like every example it prints ids, query names and columns, never a
value.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import date
from typing import TextIO
from uuid import UUID

from loguru import logger

from hcrepo import Database, EmergencyAccess, patient_trail
from hcrepo.healthcare import EncounterRepository


def page_privacy_officer(access: EmergencyAccess) -> None:
    """The break-glass alert hook: a real one pages someone. Ids only: the reason may hold
    PHI ("unresponsive, known allergy to ..."), so it stays in the audit table."""
    logger.warning("break-glass {} by {} ({}) in clinic {}", access.access_id,
                   access.actor_id, access.role, access.clinic_id)


def emergency_note(db: Database, *, clinic_id: UUID, clinician_id: UUID, encounter_id: UUID,
                   reason: str) -> bool:
    """Read a clinical note beyond the clinician's normal scope (another clinician's draft):
    recorded and alerted before the read runs. Whether the note was shown."""
    with db.context(clinic_id=clinic_id, actor_id=clinician_id, emergency_reason=reason):
        return EncounterRepository(db).get(id=encounter_id) is not None


def print_trail(auditor_url: str, patient_id: UUID, since: date | None, out: TextIO) -> int:
    count = 0
    for entry in patient_trail(auditor_url, patient_id, since):
        columns = f" [{', '.join(entry.columns)}]" if entry.kind == "changed" else ""
        glass = " BREAK-GLASS" if entry.emergency_reason else ""
        # A view records the role the caller claimed; with none, the database applied the
        # actor's membership role. A change records the role in force.
        role = entry.staff_role or "membership role"
        out.write(f"{entry.at:%Y-%m-%d %H:%M:%S} {entry.kind} {entry.what}{columns} by "
                  f"{entry.actor_id} ({role}) "
                  f"via {entry.source or 'primary'}{glass}\n")
        count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.compliance")
    commands = parser.add_subparsers(dest="command", required=True)
    trail = commands.add_parser("trail", help="who viewed and who changed one patient")
    trail.add_argument("patient_id", type=UUID)
    trail.add_argument("--since", type=date.fromisoformat)
    arguments = parser.parse_args(argv)
    auditor_url = os.environ.get("HCREPO_AUDITOR_URL")
    if not auditor_url:
        print("compliance: set HCREPO_AUDITOR_URL (the hcrepo_auditor login)", file=sys.stderr)
        return 2
    print_trail(auditor_url, arguments.patient_id, arguments.since, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
