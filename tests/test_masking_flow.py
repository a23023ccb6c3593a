"""A full flow with known PHI, against real servers, with every log record captured: none of
the seeded values appears in any of them, nor in the metrics.

Captured: a loguru sink at TRACE (text with backtrace and diagnose, and serialized JSON), a
stdlib handler at DEBUG on the root logger keeping every record whole, and psycopg's loggers
at DEBUG (routed into loguru by hcrepo). The flow: repository calls on every PHI table
(cached reads through Redis included), a unique violation on the MRN, a row failing its
model's validation, slow-query logs for every call, a failed transaction, a crash inside a
unit of work; then an application logging rows, dumps and errors with loguru and stdlib
logging through `hcrepo.mask_record` and `hcrepo.MaskingFilter`, installed as the README
says.

loguru's `diagnose` prints the values of the variables on each failing line of the
traceback; hcrepo's frames never leave it, and the test's own frames hold the PHI in a
`PhiModel` (masked repr). An application's frame holding a raw value on a failing line would
show it: that is why the README says to keep `diagnose=False` in production.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import pytest
from loguru import logger
from prometheus_client import generate_latest
from pydantic import ConfigDict, StringConstraints

import hcrepo
from hcrepo import (
    PHI,
    Database,
    ExclusionViolation,
    HcrepoError,
    InvalidRow,
    PhiModel,
    Repository,
    UniqueViolation,
    UnitOfWork,
    query,
)
from hcrepo.healthcare import (
    AppointmentRepository,
    EncounterRepository,
    Patient,
    PatientRepository,
    PrescriptionRepository,
)
from hcrepo.ops import metrics
from hcrepo.shipped import shipped_dir
from tests.support.cache import CachedDatabase
from tests.support.errors import exception_chain
from tests.support.repos import Clinic

START = datetime(2031, 2, 3, 10, tzinfo=UTC)


def _unique_digits(count: int) -> str:
    return str(uuid.uuid4().int)[:count]


class Seeds(PhiModel):
    """The seeded PHI; a PhiModel, so the test's own frames print it masked (loguru's
    diagnose shows the variables of a failing line)."""

    model_config = ConfigDict(frozen=True)
    mrn: Annotated[str, PHI()]
    first_name: Annotated[str, PHI()]
    last_name: Annotated[str, PHI()]
    new_last_name: Annotated[str, PHI()]
    date_of_birth: Annotated[date, PHI()]
    phone: Annotated[str, PHI()]
    new_phone: Annotated[str, PHI()]
    email: Annotated[str, PHI()]
    address: Annotated[str, PHI()]
    ssn: Annotated[str, PHI()]
    reason: Annotated[str, PHI()]
    note: Annotated[str, PHI()]
    diagnosis: Annotated[str, PHI()]
    drug: Annotated[str, PHI()]

    @classmethod
    def new(cls) -> Seeds:
        tag = uuid.uuid4().hex[:10]
        d = _unique_digits(20)
        return cls(
            mrn=f"MRN{tag}", first_name=f"Firstname{tag}", last_name=f"Lastname{tag}",
            new_last_name=f"Renamed{tag}", date_of_birth=date(1931, 5, 17),
            phone=f"+1 555 {d[:3]} {d[3:7]}", new_phone=f"+44 20 {d[7:11]} {d[11:15]}",
            email=f"patient.{tag}@example.org", address=f"{d[15:18]} Marker{tag} Street",
            ssn=f"9{d[:2]}-{d[2:4]}-{d[4:8]}", reason=f"Reason{tag}", note=f"Note{tag}",
            diagnosis=f"Z{tag}", drug=f"Drug{tag}",
        )

    def values(self) -> list[str]:
        """Every way a seeded value could be printed."""
        texts = [str(v) for v in self.model_dump().values()]
        born = self.date_of_birth
        texts += [born.strftime("%m/%d/%Y"), repr(born), self.ssn.replace("-", ""),
                  self.ssn.replace("-", " ")]
        return texts

    def patient_fields(self) -> dict[str, Any]:
        return {"mrn": self.mrn, "first_name": self.first_name, "last_name": self.last_name,
                "date_of_birth": self.date_of_birth, "sex": "other", "phone": self.phone,
                "email": self.email, "address": self.address, "ssn": self.ssn}


class StrictPatient(Patient):
    """The shipped patient row with a rule the seeded first name breaks."""

    first_name: Annotated[str, StringConstraints(max_length=3), PHI()]


class StrictPatients(Repository, sql=str(shipped_dir("sql") / "patients.sql")):
    @query("get_patient", phi=True)
    def get(self, *, id: uuid.UUID) -> StrictPatient | None: ...


class AppCrash(Exception):
    """The application's own error, carrying what it was handling."""

    def __init__(self, message: str, *, patient: dict[str, Any]) -> None:
        super().__init__(message)
        self.patient = patient


@dataclass
class Captured:
    text: io.StringIO = field(default_factory=io.StringIO)
    serialized: io.StringIO = field(default_factory=io.StringIO)
    records: list[logging.LogRecord] = field(default_factory=list)
    handler: logging.Handler | None = None

    def everything(self) -> str:
        stdlib = []
        formatter = logging.Formatter()
        for record in self.records:
            stdlib.append(formatter.format(record))
            stdlib.append(repr(vars(record)))
        return "\n".join([self.text.getvalue(), self.serialized.getvalue(), *stdlib])

    @contextmanager
    def application_masking(self) -> Iterator[None]:
        """The patcher and the filter installed as the README says an application does."""
        assert self.handler is not None
        masking = hcrepo.MaskingFilter()
        self.handler.addFilter(masking)
        logger.configure(patcher=hcrepo.mask_record)
        try:
            yield
        finally:
            logger.configure(patcher=lambda record: None)
            self.handler.removeFilter(masking)


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # renders exc_text too, as a real handler does
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    """Every record, unmasked by the test: hcrepo's own logger masks hcrepo's records."""
    logs = Captured()
    sinks = [
        logger.add(logs.text, level="TRACE", backtrace=True, diagnose=True, colorize=False,
                   format="{level} {name}:{line} {message} | {extra}\n{exception}"),
        logger.add(logs.serialized, level="TRACE", serialize=True),
    ]
    root, driver = logging.getLogger(), logging.getLogger("psycopg")
    levels = root.level, driver.level
    logs.handler = _Keep(logs.records)
    root.addHandler(logs.handler)
    root.setLevel(logging.DEBUG)
    driver.setLevel(logging.DEBUG)
    try:
        yield logs
    finally:
        root.removeHandler(logs.handler)
        root.setLevel(levels[0])
        driver.setLevel(levels[1])
        for sink in sinks:
            logger.remove(sink)


def hcrepo_flow(db: Database, clinic: Clinic, seeds: Seeds) -> list[BaseException]:
    """Everything hcrepo does with the seeded PHI, errors included; returns the errors."""
    raised: list[BaseException] = []
    provider = clinic.provider_ids[0]
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        patients = PatientRepository(db)
        patient = patients.create(**seeds.patient_fields())
        for _ in range(3):
            patients.get(id=patient.id)  # a miss, then cached (encrypted) hits
        patients.by_mrn(mrn=seeds.mrn)
        patients.search(name=seeds.last_name)
        patients.update_contact(id=patient.id, phone=seeds.new_phone, email=seeds.email,
                                address=seeds.address)
        patients.rename(id=patient.id, first_name=seeds.first_name,
                        last_name=seeds.new_last_name)
        list(patients.stream_all())
        appointment = AppointmentRepository(db).book(
            patient_id=patient.id, provider_id=provider, starts_at=START,
            ends_at=START + timedelta(minutes=30), reason=seeds.reason)
        AppointmentRepository(db).get(id=appointment.id)
        EncounterRepository(db).record(
            patient_id=patient.id, provider_id=provider, occurred_at=START,
            note=seeds.note, diagnosis_codes=[seeds.diagnosis])
        PrescriptionRepository(db).prescribe(
            patient_id=patient.id, prescriber_id=provider, drug_name=seeds.drug,
            dosage=seeds.note, frequency="daily", quantity=1, notes=seeds.note)
        patients.timeline(patient_id=patient.id)

        with pytest.raises(UniqueViolation) as duplicate:
            patients.create(**seeds.patient_fields())
        raised.append(duplicate.value)
        with pytest.raises(InvalidRow) as invalid:
            StrictPatients(db).get(id=patient.id)
        raised.append(invalid.value)

        def double_booking(uow: UnitOfWork, *, request: Seeds) -> None:
            PatientRepository(uow).rename(id=patient.id, first_name=request.first_name,
                                          last_name=request.last_name)
            AppointmentRepository(uow).book(
                patient_id=patient.id, provider_id=provider, starts_at=START,
                ends_at=START + timedelta(minutes=30), reason=request.reason)

        with pytest.raises(ExclusionViolation) as failed:
            db.transaction(double_booking, request=seeds)
        raised.append(failed.value)

        with pytest.raises(AppCrash) as crashed, db.unit_of_work() as uow:
            PatientRepository(uow).update_contact(
                id=patient.id, phone=seeds.phone, email=seeds.email, address=seeds.address)
            raise crash(seeds, patient) from duplicate.value
        raised.append(crashed.value)
        after = patients.get(id=patient.id)
        assert after is not None and after.phone == seeds.new_phone  # the crash rolled back
    return raised


def crash(seeds: Seeds, patient: Patient) -> AppCrash:
    return AppCrash(f"crashed on SSN {seeds.ssn} for {seeds.email}", patient=patient.model_dump())


def application_logs(db: Database, clinic: Clinic, seeds: Seeds,
                     errors: list[BaseException]) -> None:
    """An application logging what it holds: rows, dumps, errors, labelled values."""
    log = logging.getLogger("app.clinic")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        patient = PatientRepository(db).by_mrn(mrn=seeds.mrn)
    assert patient is not None and patient.ssn == seeds.ssn  # attribute access: real values
    dump, as_json = patient.model_dump(), patient.model_dump(mode="json")
    logger.info("loaded {}", patient)
    logger.info("loaded {!r} and {}", patient, [patient])
    logger.debug("dump {}", dump)
    logger.bind(patient=as_json, rows=[dump], SSN=seeds.ssn).trace("with extra")
    logger.info("contact: phone {} e-mail {}", seeds.phone, seeds.email)
    logger.info("SSN: {}", seeds.ssn.replace("-", " "))
    log.info("loaded %s", patient)
    log.debug("dump %s and %r", dump, as_json)
    log.info("by name %(first_name)s %(last_name)s", dump)
    log.warning("extra", extra={"patient": dump, "visits": [{"note": seeds.note}]})
    log.info("ssn=%s dob=%s", seeds.ssn, seeds.date_of_birth)
    for error in errors:  # their frames are hcrepo_flow's lines: diagnose shows masked Seeds
        logger.opt(exception=error).error("request failed")
        log.error("request failed", exc_info=error)


def test_no_seeded_value_reaches_a_log_record_or_a_metric(
    cached_db: CachedDatabase, clinic: Clinic, captured: Captured
) -> None:
    seeds = Seeds.new()
    db = cached_db(slow_query_threshold_ms=0.001)  # every call is logged as slow
    errors = hcrepo_flow(db, clinic, seeds)
    hcrepo_only = captured.everything()
    assert [value for value in seeds.values() if value in hcrepo_only] == []
    for error in errors:  # hcrepo's errors carry no value; the application's crash does
        shown = "".join(f"{e}{e!r}{e.args!r}" for e in exception_chain(error)
                        if isinstance(e, HcrepoError))
        assert [value for value in seeds.values() if value in shown] == []
    with captured.application_masking():
        application_logs(db, clinic, seeds, errors)

    printed = captured.everything()
    leaked = [value for value in seeds.values() if value in printed]
    assert leaked == [], leaked
    scraped = generate_latest(metrics.REGISTRY).decode() + db.metrics()
    assert [value for value in seeds.values() if value in scraped] == []

    # The flow did log: slow queries, psycopg's records, the application's, masked.
    assert "slow query create_patient" in printed and "slow query get_patient" in printed
    assert "psycopg" in printed
    assert "Patient(id=UUID(" in printed and "first_name='***'" in printed
    assert "AppCrash: crashed on SSN *** for ***" in printed
    assert "Seeds(mrn='***'" in printed  # diagnose printed the failing lines' variables
    assert "UniqueViolation" in printed and "InvalidRow" in printed
    assert "first_name: string_too_long" in printed
    assert any(r.name == "app.clinic" for r in captured.records)
