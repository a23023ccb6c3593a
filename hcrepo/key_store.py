"""`clinic_data_keys` read and written by the application role on the primary.

Each look-up is one round trip on an autocommit pool connection of its own (the clinic set
transaction-locally, then the statement, one Sync): a key is made and committed before any
value is sealed with it, even from inside a unit of work that later rolls back, and it is
read from the primary, where a key another process just made is already visible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from hcrepo.crypto.keyring import StoredKey
from hcrepo.execution import ensure_open, run_or_translate
from hcrepo.pipeline import Statement
from hcrepo.routing.node import Node

# The key store acts for the clinic, not for a staff member: no actor, no role, whatever
# the session holds.
_CLINIC = ("SELECT set_config('app.clinic_id', $1, true), set_config('app.actor_id', '', true),"
           " set_config('app.role', '', true)")
_LOAD = ("/* hcrepo:load_data_keys */ SELECT version, master_version, wrapped, "
         "state = 'active' FROM clinic_data_keys ORDER BY version")
# Row-level security limits the NOT EXISTS to the clinic in context; two processes making
# the first key at once collide on the primary key, and one of them does nothing.
_CREATE = ("/* hcrepo:create_data_key */ INSERT INTO clinic_data_keys "
           "(clinic_id, version, master_version, wrapped, state) "
           "SELECT $1::uuid, 1, $2, $3, 'active' "
           "WHERE NOT EXISTS (SELECT FROM clinic_data_keys) ON CONFLICT DO NOTHING")


class PrimaryKeyStore:
    """A `DataKeyStore` over the primary's pool."""

    def __init__(self, primary: Callable[[], Node]) -> None:
        self._primary = primary

    def load(self, clinic_id: UUID) -> list[StoredKey]:
        rows = self._run(clinic_id, Statement(_LOAD), "load_data_keys")
        return [StoredKey(int(v), int(m), bytes(w), bool(a)) for v, m, w, a in rows]

    def create_first(self, clinic_id: UUID, master_version: int, wrapped: bytes) -> None:
        self._run(clinic_id, Statement(_CREATE, (str(clinic_id), master_version, wrapped)),
                  "create_data_key")

    def _run(self, clinic_id: UUID, statement: Statement, name: str) -> list[Any]:
        with self._primary().connection() as conn:
            ensure_open(conn, before=name, query=name)
            results = run_or_translate(
                conn, [Statement(_CLINIC, (str(clinic_id),)), statement], name, name,
                before=name)
            result = results[-1]
            if not result.ntuples:
                return []
            transformer = conn.transformer
            transformer.set_pgresult(result)
            rows: list[Any] = transformer.load_rows(0, result.ntuples, tuple)
            return rows
