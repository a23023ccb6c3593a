"""A queue worker over a plain Redis list: contact clean-up for newly registered patients.

The producer (`register_patient`, called by the web request that registers a patient)
writes through hcrepo inside a `db.context` block, takes `db.last_write_token()` and queues a
job holding ids and that token only: the job sits in Redis, so it carries no PHI.

The worker pops one job at a time (BLPOP with a short timeout, so that it notices a stop),
enters the job's clinic and actor, and reads inside `db.read_after(token)`: a replica that
has not replayed the producer's commit is passed over, so the patient written a moment ago
is found even while replicas lag. On SIGTERM (or Ctrl-C) it finishes the job in hand, pops
no more, closes the Database and exits 0.

    DATABASE_URL=... READ_REPLICA_URLS=... REDIS_URL=redis://... python examples/worker.py

WORKER_QUEUE names the list (default `hcrepo:examples:contacts`); jobs whose patient cannot
be read are pushed to `<queue>:failed`. Log lines name patient ids and outcomes, never values.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import date
from types import FrameType
from typing import Literal
from uuid import UUID

import redis
from loguru import logger

from hcrepo import ConfigError, Database
from hcrepo.healthcare import PatientRepository, Sex

QUEUE = "hcrepo:examples:contacts"
POP_TIMEOUT = 1.0  # seconds: how long a stop request may wait for an idle worker
Outcome = Literal["normalised", "unchanged", "missing"]


@dataclass(frozen=True)
class Job:
    """What the queue holds: ids and a read-your-writes token, nothing a patient told us."""

    clinic_id: UUID
    actor_id: UUID
    patient_id: UUID
    token: str | None

    def dumps(self) -> str:
        return json.dumps({
            "clinic_id": str(self.clinic_id), "actor_id": str(self.actor_id),
            "patient_id": str(self.patient_id), "token": self.token,
        })

    @classmethod
    def loads(cls, raw: bytes | str) -> Job:
        data = json.loads(raw)
        return cls(UUID(data["clinic_id"]), UUID(data["actor_id"]), UUID(data["patient_id"]),
                   data["token"])


def register_patient(
    db: Database,
    client: redis.Redis,
    *,
    clinic_id: UUID,
    actor_id: UUID,
    mrn: str,
    first_name: str,
    last_name: str,
    date_of_birth: date,
    sex: Sex,
    phone: str | None = None,
    queue: str = QUEUE,
) -> Job:
    """The producer: create the patient, then queue its contact clean-up with the token of
    that commit (taken inside the block that wrote, where the position lives)."""
    with db.context(clinic_id=clinic_id, actor_id=actor_id):
        patient = PatientRepository(db).create(
            mrn=mrn, first_name=first_name, last_name=last_name, date_of_birth=date_of_birth,
            sex=sex, phone=phone,
        )
        job = Job(clinic_id, actor_id, patient.id, db.last_write_token())
    client.rpush(queue, job.dumps())
    return job


def normalised_phone(phone: str) -> str:
    """Digits only, keeping a leading `+` (what an SMS gateway accepts)."""
    digits = re.sub(r"\D", "", phone)
    return f"+{digits}" if phone.strip().startswith("+") else digits


class Worker:
    """Pops jobs from `queue` until `stop()` is called; one job at a time, each to the end."""

    def __init__(self, db: Database, client: redis.Redis, queue: str = QUEUE) -> None:
        self.db = db
        self.client = client
        self.queue = queue
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end after the job in hand (safe to call from a signal handler)."""
        self._stopping.set()

    def run(self) -> int:
        """Handle jobs until stopped; the number handled."""
        handled = 0
        while not self._stopping.is_set():
            popped = self.client.blpop([self.queue], timeout=POP_TIMEOUT)
            if popped is None:
                continue
            job = Job.loads(popped[1])
            outcome = self.handle(job)
            handled += 1
            if outcome == "missing":
                self.client.rpush(f"{self.queue}:failed", job.dumps())
            logger.info("job done: patient {} {}", job.patient_id, outcome)
        return handled

    def handle(self, job: Job) -> Outcome:
        """One job: read the patient the producer wrote, write back a normalised phone."""
        with self.db.context(clinic_id=job.clinic_id, actor_id=job.actor_id), \
                self.db.read_after(job.token):
            patients = PatientRepository(self.db)
            patient = patients.get(id=job.patient_id)
            if patient is None:
                return "missing"
            if patient.phone is None or normalised_phone(patient.phone) == patient.phone:
                return "unchanged"
            patients.update_contact(id=patient.id, phone=normalised_phone(patient.phone),
                                    email=patient.email, address=patient.address)
            return "normalised"


def main() -> int:
    try:
        db = Database.from_env()
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    if not db.settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        print("worker: REDIS_URL must name one Redis server (the queue is a plain list)",
              file=sys.stderr)
        return 2
    client = redis.Redis.from_url(db.settings.redis_url)
    worker = Worker(db, client, os.environ.get("WORKER_QUEUE", QUEUE))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # An event and a bare write: logging here could wait on a lock the interrupted code
        # holds.
        worker.stop()
        os.write(2, f"worker: {signal.Signals(signum).name}, stopping after the job in hand\n"
                 .encode())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with db:
        logger.info("worker ready on {}", worker.queue)
        handled = worker.run()
    client.close()
    logger.info("worker stopped after {} jobs", handled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
