"""Point read by primary key under the staff-role policies against the same read under the
tenant policies alone, single thread, interleaved.

Two databases on one server, seeded alike (the same clinic and actor ids): one migrated up
to 0005_staff_and_session_state (tenant isolation only), one to the newest migration (the
restrictive role policies of 0007_staff_roles: the membership look-up of
`hcrepo_scope_role()`, once per statement as an InitPlan). Both read as hcrepo_app in one
clinic context whose actor is a doctor member:
- with no role claimed (the membership role applies),
- with the role claimed (`role="doctor"`: the look-up checks the claim instead).
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from benchmarks.bench_point_read import CONNECTIONS, Patients
from benchmarks.harness import database, interleaved, pin, table
from hcrepo import Database, Settings, bind_context
from hcrepo.admin import migrate
from hcrepo.testing import PostgresServer

TENANT = "0005 tenant policies"
ROLES = "0007 role policies, membership role"
CLAIMED = "0007 role policies, role claimed"


def main() -> str:
    clinic_id, actor_id = uuid.uuid4(), uuid.uuid4()
    with PostgresServer() as server:
        server.start()
        # Everything after 0005 rolled back: the audit trail, the role policies, encryption.
        later = sum(1 for path in migrate.migrations_dir().glob("*.sql")
                    if not path.name.endswith(".rollback.sql") and path.name > "0005_~")
        before = database(server, "hcrepo_bench_0005", roll_back=later, clinic_id=clinic_id,
                          actor_id=actor_id)
        after = database(server, "hcrepo_bench_roles", clinic_id=clinic_id, actor_id=actor_id)
        pin(server)
        # No access log and no sealer: 0005 has no audit schema to write them to, and the
        # comparison is of the policies alone.
        sized: dict[str, Any] = {"pool_min": CONNECTIONS, "pool_max": CONNECTIONS,
                                 "redis_url": "", "access_log": False, "audit_sealer": False}
        with Database(Settings(database_url=before.app_url, **sized)) as old_db, \
                Database(Settings(database_url=after.app_url, **sized)) as new_db:
            old, new = Patients(old_db), Patients(new_db)
            old_ids = itertools.cycle(before.patient_ids[:500])
            new_ids = itertools.cycle(after.patient_ids[:500])
            # Each variant carries its own context (bind_context, the same small cost for
            # all): the claimed role is in force only for its variant.
            with new_db.context(clinic_id=clinic_id, actor_id=actor_id):
                tenant = bind_context(lambda: old.get(id=next(old_ids)))
                roles = bind_context(lambda: new.get(id=next(new_ids)))
                with new_db.context(role="doctor"):
                    claimed = bind_context(lambda: new.get(id=next(new_ids)))
            variants = {TENANT: tenant, ROLES: roles, CLAIMED: claimed}
            for fn in variants.values():
                assert fn() is not None, "the context did not reach the policies"
            medians = interleaved(variants, rounds=240)
    out = table(medians, TENANT, "Point read under the staff-role policies (single thread)")
    ratios = [
        ("role policies / tenant policies (target <= 1.10)", ROLES, TENANT),
        ("role policies, role claimed / tenant policies (target <= 1.10)", CLAIMED, TENANT),
        ("checking a claimed role / applying the membership role", CLAIMED, ROLES),
    ]
    out += "\n\n| ratio | value |\n|---|---:|\n" + "\n".join(
        f"| {label} | {medians[a] / medians[b]:.2f} |" for label, a, b in ratios
    )
    return out


if __name__ == "__main__":
    print(main())
