"""Encrypted SSN against the same reads with the SSN in clear, single thread, interleaved.

- point read, encrypted: `PatientRepository.get` as a doctor: the row through the
  `patient_records` view (the ciphertext for the roles that may see it), the SSN decrypted
  with the clinic's cached data key, the row validated again;
- point read, clear: the same columns with the SSN in a plain column (`ssn_clear`, added to
  this throw-away database only), same model shape, same @cached declaration (no Redis);
- point read, ciphertext through the view: the shipped query's SQL, the ciphertext not
  decrypted (what the view costs the server);
- SSN search, blind index: `PatientRepository.by_ssn`: HMAC of the digits, equality on the
  UNIQUE (clinic_id, ssn_bidx) index, the view join and the decryption;
- SSN search, clear: equality on a UNIQUE (clinic_id, ssn_clear) index.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import os
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel

from benchmarks.harness import interleaved, stack, table
from hcrepo import Database, Repository, Settings, cached, query
from hcrepo.config import server_options
from hcrepo.healthcare import PatientRepository

SQL_FILE = Path(__file__).parent / "sql" / "encryption.sql"
PATIENTS = 500
ENCRYPTED = "point read, SSN encrypted (view, AES-GCM)"
CLEAR = "point read, SSN in clear"
VIEW = "point read, SSN ciphertext through patient_records, not decrypted"
BLIND = "SSN search, blind index (HMAC, view, AES-GCM)"
PLAIN = "SSN search, plain indexed equality"


class ClearPatient(BaseModel):
    id: uuid.UUID
    clinic_id: uuid.UUID
    mrn: str
    first_name: str
    last_name: str
    date_of_birth: datetime.date
    sex: str
    phone: str | None
    email: str | None
    address: str | None
    ssn: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime


class ClearPatients(Repository, sql=str(SQL_FILE)):
    @query("get_patient_clear", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"], independent_of=("actor_id",))
    def get(self, *, id: uuid.UUID) -> ClearPatient | None: ...

    @query("get_patient_ciphertext", phi=True)
    @cached(ttl="patient", tags=["patient:{id}"], independent_of=("actor_id",))
    def ciphertext(self, *, id: uuid.UUID) -> ClearPatient | None: ...

    @query("get_patient_by_clear_ssn", phi=True)
    def by_ssn(self, *, ssn: str) -> ClearPatient | None: ...


def ssn_of(n: int) -> str:
    return f"{100 + n // 10000:03d}-{n // 100 % 100:02d}-{n % 10000:04d}"


def main() -> str:
    with stack() as s:
        ids = s.patient_ids[:PATIENTS]
        ssns = [ssn_of(n) for n in range(PATIENTS)]
        with psycopg.connect(s.superuser_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE patients ADD COLUMN ssn_clear text")
            conn.execute("CREATE UNIQUE INDEX ON patients (clinic_id, ssn_clear)")
            conn.execute("GRANT SELECT (ssn_clear) ON patients TO hcrepo_app")
            with conn.cursor() as cursor:
                cursor.executemany("UPDATE patients SET ssn_clear = %s WHERE id = %s",
                                   list(zip(ssns, ids, strict=True)))
        doctor = make_conninfo(s.app_url, options=server_options(s.app_url,
                                                                 **{"app.role": "doctor"}))
        settings = Settings(database_url=doctor, redis_url="", pool_min=4, pool_max=4,
                            HCREPO_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
                            HCREPO_BLIND_INDEX_KEY=base64.b64encode(os.urandom(32)).decode())
        with Database(settings) as db, db.context(clinic_id=s.clinic_id, actor_id=s.actor_id):
            encrypted, clear = PatientRepository(db), ClearPatients(db)
            for patient_id, ssn in zip(ids, ssns, strict=True):
                encrypted.set_ssn(id=patient_id, ssn=ssn)
            with psycopg.connect(s.superuser_url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE patients")
            sample = encrypted.get(id=ids[7])
            assert sample is not None and sample.ssn == ssns[7], "SSN not decrypted"
            found = encrypted.by_ssn(ssn=ssns[9].replace("-", ""))
            assert found is not None and found.id == ids[9], "blind index did not match"
            rows = itertools.cycle(range(PATIENTS))
            medians = interleaved({
                ENCRYPTED: lambda: encrypted.get(id=ids[next(rows)]),
                CLEAR: lambda: clear.get(id=ids[next(rows)]),
                VIEW: lambda: clear.ciphertext(id=ids[next(rows)]),
                BLIND: lambda: encrypted.by_ssn(ssn=ssns[next(rows)]),
                PLAIN: lambda: clear.by_ssn(ssn=ssns[next(rows)]),
            }, rounds=60)
    out = table(medians, CLEAR, "Encrypted SSN against the SSN in clear (single thread)")
    ratios = [
        ("point read, encrypted / clear (target <= 1.15)", ENCRYPTED, CLEAR),
        ("SSN search, blind index / plain indexed equality (target <= 1.15)", BLIND, PLAIN),
        ("the view alone (server) / clear", VIEW, CLEAR),
        ("decryption alone (client) / clear", ENCRYPTED, VIEW),
    ]
    out += "\n\n| ratio | value |\n|---|---:|\n" + "\n".join(
        f"| {label} | {medians[a] / medians[b]:.2f} |" for label, a, b in ratios
    )
    return out


if __name__ == "__main__":
    print(main())
