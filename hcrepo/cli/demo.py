"""`hcrepo demo`: the whole path on throw-away servers, start to finish.

It starts an embedded primary, a streaming replica of it and a Redis server, migrates as the
owner role, and from then on works only through hcrepo as the application role `hcrepo_app`:
two clinics are seeded through the healthcare repositories, each clinic sees only its own
patients, a missing clinic is refused before any round trip, row-level security refuses a
cross-clinic write, a read right after a write sees it while the replica's replay is paused,
a cached read is invalidated by a commit, a double booking is refused, a receptionist is
refused a clinical note and a nurse breaks the glass to read one, recorded and alerted,
an SSN is stored encrypted and found through its blind index, and the audit chain is
verified and one patient's trail shown as the auditor role. Everything is removed on
exit, on error too. Output names clinics, MRNs and counts, never PHI; a patient is
printed once, as its repr masks it.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, TextIO
from uuid import UUID

import psycopg

from hcrepo import (
    Database,
    EmergencyAccess,
    ExclusionViolation,
    RowSecurityViolation,
    Settings,
    TenantContextMissing,
)
from hcrepo.admin import migrate
from hcrepo.admin.connect import conninfo_url
from hcrepo.compliance import auditor
from hcrepo.compliance.sealer import seal_pending
from hcrepo.compliance.trail import patient_trail
from hcrepo.compliance.verify import verify
from hcrepo.healthcare import (
    AppointmentRepository,
    ClinicRepository,
    EncounterRepository,
    PatientRepository,
    ProviderRepository,
    Sex,
    StaffRole,
    UserRepository,
)
from hcrepo.ops import metrics

if TYPE_CHECKING:
    from hcrepo.testing import PostgresServer

# Obviously fake people: (MRN, first name, last name, date of birth, sex).
CLINICS: dict[str, Sequence[tuple[str, str, str, str, Sex]]] = {
    "Demo Clinic North": [
        ("N-0001", "Testy", "McTestface", "1980-01-01", "other"),
        ("N-0002", "Jane", "Placeholder", "1975-06-15", "female"),
        ("N-0003", "John", "Sampleton", "1990-12-31", "male"),
    ],
    "Demo Clinic South": [
        ("S-0001", "Fake", "Person", "2001-02-03", "unknown"),
        ("S-0002", "Dummy", "Examplesson", "1969-07-20", "female"),
    ],
}
FOUNDER = uuid.UUID("00000000-0000-4000-8000-00000000d3e0")  # registers the demo's clinics
DEMO_SSN = "078-05-1120"  # a famously void SSN (printed on sample cards in 1938)
MISSING_EXTRA = "the demo needs the testing extra: pip install 'hcrepo[testing]'"


def run(out: TextIO = sys.stdout) -> int:
    # Imported here, not at the top: `hcrepo migrate` in production must not load the
    # throw-away servers, and they need an extra production does not install.
    try:
        from hcrepo.testing import PostgresServer, RedisServer, wait_for_replay
    except ImportError as exc:
        if exc.name != "hcrepo.testing":
            raise
        print(f"hcrepo: {MISSING_EXTRA}", file=sys.stderr)
        return 2
    with ExitStack() as servers:
        primary = servers.enter_context(PostgresServer())
        out.write(f"throw-away PostgreSQL on {primary.host}:{primary.port}\n")
        replica = primary.create_replica()
        redis = servers.enter_context(RedisServer())
        out.write(f"streaming replica on port {replica.port}, Redis on port {redis.port}\n")
        app_password, auditor_password = secrets.token_urlsafe(), secrets.token_urlsafe()
        owner_url = migrate.bootstrap(
            primary.superuser_url, database="hcrepo_demo", owner_password=secrets.token_urlsafe(),
            app_password=app_password, auditor_password=auditor_password,
        )
        applied = migrate.apply(owner_url, setting="demo owner URL")
        out.write(f"migrations applied as {migrate.OWNER_ROLE}: {', '.join(applied)}\n")
        app_url = conninfo_url(owner_url, user=migrate.APP_ROLE, password=app_password)
        replica_url = replica.url(user=migrate.APP_ROLE, password=app_password,
                                  dbname="hcrepo_demo")
        wait_for_replay(replica, primary.current_wal_lsn())
        settings = Settings(
            database_url=app_url, read_replica_urls=[replica_url], redis_url=redis.url,
            cache_encryption_key=base64.b64encode(secrets.token_bytes(32)).decode(),
            pool_min=1, pool_max=4, health_interval=0.2,
            master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
            blind_index_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
        with Database(settings, on_emergency_access=lambda access: _alert(out, access)) as db:
            patient_id = _walk_through(db, out, replica, app_url)
            _encrypted_ssn(db, out, conninfo_url(primary.superuser_url, dbname="hcrepo_demo"))
        # After close: this process's audit rows sealed, its access log written.
        _audit_trail(app_url, conninfo_url(owner_url, user=migrate.AUDITOR_ROLE,
                                           password=auditor_password), patient_id, out)
    out.write("\nservers stopped and removed\n")
    return 0


def _walk_through(db: Database, out: TextIO, replica: PostgresServer, app_url: str) -> UUID:
    staffed = {name: _seed(db, name, people) for name, people in CLINICS.items()}
    clinics = {name: clinic_id for name, (clinic_id, _admin, _doctor) in staffed.items()}
    out.write(f"connected as {migrate.APP_ROLE}; seeded {len(clinics)} clinics\n\n")
    for name, clinic_id in clinics.items():
        with db.context(clinic_id=clinic_id):
            mrns = [p.mrn for p in PatientRepository(db).search(sort="mrn")]
        out.write(f"{name} sees {len(mrns)} patients: {', '.join(mrns)}\n")
    try:
        PatientRepository(db).count()
    except TenantContextMissing:
        out.write("no clinic context: refused by hcrepo before any round trip\n")
    north, south = clinics.values()
    _, admin, doctor = staffed["Demo Clinic North"]
    out.write(f"North writing a patient into South: {_cross_write(app_url, north, south)}\n")
    out.write(_printed_masked(db, north) + "\n")

    with db.context(clinic_id=north, actor_id=doctor):
        patients = PatientRepository(db)
        patient = patients.search(mrn="N-0001")[0]
        patients.get(id=patient.id)  # fills the cache
        with _replay_paused(replica):
            with db.unit_of_work() as uow:
                PatientRepository(uow).update_contact(
                    id=patient.id, phone="+1 555 0100", email=None, address=None
                )
            fresh = patients.get(id=patient.id)
            seen = fresh is not None and fresh.phone == "+1 555 0100"
            out.write("read right after the write, replica replay paused: "
                      f"{'sees the new phone' if seen else 'STALE'} (cache invalidated at "
                      "commit, read routed past the lagging replica)\n")
        out.write(f"token for a queued job: {db.last_write_token()}\n")
    with db.context(clinic_id=north, actor_id=doctor):  # the next request: no write of its own
        other = patients.search(mrn="N-0002")[0]
        hits = _cache_hits("get_patient")
        for _ in range(3):
            patients.get(id=other.id)
        out.write(f"another patient read three times: {_cache_hits('get_patient') - hits:.0f} "
                  "served from Redis (AES-GCM encrypted, the clinic in its key)\n")
        out.write(_double_booking(db, admin, patient.id))
    _roles(db, out, north, (admin, doctor), patient.id)
    served = {name: node["served"] for name, node in db.health()["nodes"].items()}
    out.write(f"reads served per node: {served}\n")
    return patient.id


def _audit_trail(app_url: str, auditor_url: str, patient_id: UUID, out: TextIO) -> None:
    """The written patient's trail as the auditor sees it, after sealing and verifying."""
    with psycopg.connect(app_url, autocommit=True) as conn:
        seal_pending(conn)
    with auditor.session(auditor_url, "demo auditor URL", "verify", {}) as conn:
        checked = verify(conn)
    out.write(f"\naudit chain: {checked.links} links in {checked.clinics} clinic chains, "
              f"{'verified' if checked.ok else 'BROKEN'}; trail of N-0001 as "
              f"{migrate.AUDITOR_ROLE}:\n")
    for entry in patient_trail(auditor_url, patient_id, setting="demo auditor URL"):
        # An insert writes every column: the list says nothing there.
        updated = entry.columns and not entry.what.startswith("insert")
        columns = f" [{', '.join(entry.columns)}]" if updated else ""
        out.write(f"  {entry.kind} {entry.what}{columns} by {entry.actor_id}\n")


def _printed_masked(db: Database, clinic_id: UUID) -> str:
    """A row as a log line or a debugger prints it, PHI masked; attributes hold the values."""
    with db.context(clinic_id=clinic_id):
        patient = PatientRepository(db).search(mrn="N-0002")[0]
    return f"a patient printed: {patient!r}\nits attribute patient.mrn: {patient.mrn}\n"


def _encrypted_ssn(db: Database, out: TextIO, superuser_url: str) -> None:
    """An SSN sealed in the application, what the database holds, and a search by another
    spelling of it through the blind index. The SSN itself is never printed."""
    clinic_id, _admin, doctor = _seed(db, "Demo Clinic East", [])
    with db.context(clinic_id=clinic_id, actor_id=doctor):
        patients = PatientRepository(db)
        patient = patients.create(mrn="E-0001", first_name="Cipher", last_name="Example",
                                  date_of_birth=date(1985, 5, 5), sex="other",
                                  ssn=DEMO_SSN)
        with psycopg.connect(superuser_url) as conn:
            row = conn.execute("SELECT ssn FROM patients WHERE id = %s", [patient.id]).fetchone()
        stored = str(row[0]) if row else ""
        found = patients.by_ssn(ssn=DEMO_SSN.replace("-", " "))
    out.write(f"\nSSN stored encrypted: the superuser reads {stored[:14]}... "
              f"({'not the SSN' if DEMO_SSN[-4:] not in stored else 'PLAINTEXT'})\n")
    decrypted = found is not None and found.ssn == DEMO_SSN
    out.write("patient found by its SSN spelled otherwise, through the blind index: "
              f"{found.mrn if found else 'NOT FOUND'} (decrypted for the doctor: "
              f"{'the same SSN' if decrypted else 'WRONG'})\n")


def _cache_hits(query: str) -> float:
    return metrics.REGISTRY.get_sample_value("hcrepo_cache_hits_total", {"query": query}) or 0.0


def _seed(
    db: Database, name: str, people: Sequence[tuple[str, str, str, str, Sex]]
) -> tuple[UUID, UUID, UUID]:
    """The clinic, its admin (its first member) and a doctor the admin onboards."""
    with db.context(actor_id=FOUNDER):
        clinic = ClinicRepository(db).create(name=name)
    with db.context(clinic_id=clinic.id, actor_id=FOUNDER):
        admin = _onboard(db, "admin")
    with db.context(clinic_id=clinic.id, actor_id=admin):
        doctor = _onboard(db, "doctor")
    with db.unit_of_work(clinic_id=clinic.id, actor_id=doctor) as uow:
        patients = PatientRepository(uow)
        for mrn, first, last, born, sex in people:
            patients.create(mrn=mrn, first_name=first, last_name=last,
                            date_of_birth=date.fromisoformat(born), sex=sex)
    return clinic.id, admin, doctor


def _onboard(db: Database, role: StaffRole) -> UUID:
    email = f"demo-{role}-{uuid.uuid4().hex[:8]}@example.invalid"
    return UserRepository(db).onboard(email=email, full_name=f"Demo {role}", role=role).id


def _cross_write(app_url: str, acting: UUID, other: UUID) -> str:
    """Plain psycopg as hcrepo_app: the database itself refuses, whatever the client does."""
    try:
        with psycopg.connect(app_url) as conn:
            conn.execute("SELECT set_config('app.clinic_id', %s, true)", [str(acting)])
            conn.execute(
                "INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)"
                " VALUES (%s, 'X-0001', 'Not', 'Allowed', '2000-01-01', 'unknown')",
                [other],
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        return f"refused by row-level security ({exc.sqlstate})"
    return "ALLOWED (tenant isolation is broken)"


def _double_booking(db: Database, admin: UUID, patient_id: UUID) -> str:
    with db.context(actor_id=admin):  # adding a provider is an admin's
        provider = ProviderRepository(db).create(display_name="Dr Demo")
    start = datetime(2030, 1, 7, 9, tzinfo=UTC)
    appointments = AppointmentRepository(db)
    appointments.book(patient_id=patient_id, provider_id=provider.id, starts_at=start,
                      ends_at=start + timedelta(minutes=30))
    try:
        appointments.book(patient_id=patient_id, provider_id=provider.id,
                          starts_at=start + timedelta(minutes=15),
                          ends_at=start + timedelta(minutes=45))
    except ExclusionViolation as exc:
        return f"overlapping booking for the same provider: refused ({exc.constraint})\n"
    return "overlapping booking for the same provider: ALLOWED (constraint missing)\n"


def _roles(
    db: Database, out: TextIO, clinic: UUID, staff: tuple[UUID, UUID], patient_id: UUID
) -> None:
    """Minimum necessary, enforced by PostgreSQL: a receptionist gets no clinical note and
    cannot claim a doctor's role; a nurse reads another's draft note only by breaking the
    glass, which is recorded and raises the alert hook."""
    admin, doctor = staff
    with db.context(clinic_id=clinic, actor_id=admin):
        receptionist, nurse = _onboard(db, "receptionist"), _onboard(db, "nurse")
        provider = ProviderRepository(db).create(display_name="Dr Notes", user_id=doctor)
    with db.context(clinic_id=clinic, actor_id=doctor):
        note = EncounterRepository(db).record(
            patient_id=patient_id, provider_id=provider.id, appointment_id=None,
            occurred_at=datetime(2030, 1, 7, 9, tzinfo=UTC), note="draft", diagnosis_codes=[])
    notes = EncounterRepository(db)
    with db.context(clinic_id=clinic, actor_id=receptionist, role="receptionist"):
        seen = PatientRepository(db).get(id=patient_id) is not None
        out.write(f"\nreceptionist: patient demographics {'shown' if seen else 'HIDDEN'}, "
                  f"clinical note {'SHOWN' if notes.get(id=note.id) else 'refused'}\n")
    with db.context(clinic_id=clinic, actor_id=receptionist, role="doctor"):
        try:
            notes.get(id=note.id)
            out.write("receptionist claiming a doctor's role: ALLOWED\n")
        except RowSecurityViolation as exc:
            out.write(f"receptionist claiming a doctor's role: refused by PostgreSQL "
                      f"({exc.sqlstate})\n")
    with db.context(clinic_id=clinic, actor_id=nurse, role="nurse"):
        out.write(f"nurse, another clinician's draft note: "
                  f"{'SHOWN' if notes.get(id=note.id) else 'hidden'}\n")
    with db.context(clinic_id=clinic, actor_id=nurse, role="nurse",
                    emergency_reason="patient collapsed, history needed"):
        out.write(f"nurse breaking the glass: the draft note is "
                  f"{'shown' if notes.get(id=note.id) else 'HIDDEN'}\n")


def _alert(out: TextIO, access: EmergencyAccess) -> None:
    out.write(f"alert hook: break-glass by a {access.role} recorded in audit.emergency_access\n")


@contextmanager
def _replay_paused(replica: PostgresServer) -> Iterator[None]:
    """Replay stopped on the replica for the block; WAL still arrives, nothing applies."""
    with psycopg.connect(replica.superuser_url, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            yield
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser(
        "demo", help="walk through hcrepo on throw-away servers (needs hcrepo[testing])",
        description="Start a throw-away PostgreSQL, a streaming replica and Redis; bootstrap, "
        "migrate, seed two fake clinics and show tenant isolation, read-your-writes, caching "
        "and a refused double booking. Everything is removed on exit. Needs the testing extra: "
        "pip install 'hcrepo[testing]'.",
    ).set_defaults(command=lambda _args: run())
