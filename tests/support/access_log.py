"""Helpers of the access log tests: what audit.access_log holds for one clinic, a bounded
wait for rows to land, and a worker process (run as `python -m tests.support.access_log`)
that the crash tests kill.

The worker reads one patient in a loop, under a clinic context, with the settings given as
JSON on its command line. After each read returns it stores the number of reads done in
an 8-byte counter file (mmap), so that a test that SIGKILLs it knows exactly how many reads
it made. It obeys lines on stdin: `reads N` (N reads, then `done`), `spilled N` (wait until
N rows were spilled, then `spilled`), `loop` (read until killed).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from uuid import UUID

import psycopg

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Logged:
    recorded_at: float
    logged_at: float
    actor_id: UUID | None
    clinic_id: UUID
    staff_role: str | None
    query: str
    patient_ids: list[UUID]
    source: str
    emergency_reason: str | None


def logged(superuser_url: str, clinic_id: UUID) -> list[Logged]:
    """The clinic's access log rows, oldest first (read as the superuser)."""
    with psycopg.connect(superuser_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM recorded_at)::float8, extract(epoch FROM logged_at)::float8,"
            " actor_id, clinic_id, staff_role, query, patient_ids, source, emergency_reason"
            " FROM audit.access_log WHERE clinic_id = %s ORDER BY recorded_at, logged_at",
            [clinic_id],
        ).fetchall()
    return [Logged(*row) for row in rows]


def wait_logged(superuser_url: str, clinic_id: UUID, count: int,
                timeout: float = 30.0) -> list[Logged]:
    """The clinic's rows once at least `count` are there (or what is there at `timeout`)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    rows = logged(superuser_url, clinic_id)
    while len(rows) < count and time.monotonic() < deadline:
        pause.wait(0.05)
        rows = logged(superuser_url, clinic_id)
    return rows


class Worker:
    """The worker process, started with `settings` (Settings keyword arguments)."""

    def __init__(self, settings: dict[str, Any], clinic_id: UUID, actor_id: UUID,
                 patient_id: UUID, counter: Path) -> None:
        counter.write_bytes(b"\0" * 8)
        self.counter = counter
        spec = {"settings": settings, "clinic_id": str(clinic_id), "actor_id": str(actor_id),
                "patient_id": str(patient_id), "counter": str(counter)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.access_log", json.dumps(spec)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.expect("ready")

    def send(self, line: str) -> None:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def expect(self, word: str, timeout: float = 60.0) -> None:
        """Wait for the worker's next line, which must be `word` (bounded by `timeout`)."""
        stdout = self.process.stdout
        assert stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert got and got[0].strip() == word, f"worker said {got!r}, expected {word!r}"

    @property
    def reads(self) -> int:
        value: int = struct.unpack("<q", self.counter.read_bytes()[:8])[0]
        return value

    def kill(self) -> None:
        self.process.kill()  # SIGKILL
        self.process.wait(30)


def _main(spec: dict[str, Any]) -> None:
    from hcrepo import Database, Settings
    from hcrepo.healthcare import PatientRepository
    from hcrepo.ops import metrics

    db = Database(Settings(**spec["settings"]))
    db.open()
    with open(spec["counter"], "r+b") as file:
        counter = mmap.mmap(file.fileno(), 8)
    patients = PatientRepository(db)
    patient = UUID(spec["patient_id"])
    done = 0
    with db.context(clinic_id=spec["clinic_id"], actor_id=spec["actor_id"]):
        print("ready", flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "reads":
                for _ in range(int(argument)):
                    patients.get(id=patient)
                    done += 1
                    struct.pack_into("<q", counter, 0, done)
                print("done", flush=True)
            elif command == "spilled":
                spilled = metrics.ACCESS_LOG_ROWS.labels(outcome="spilled")
                deadline = time.monotonic() + 30
                while spilled._value.get() < int(argument) and time.monotonic() < deadline:
                    threading.Event().wait(0.01)
                print("spilled", flush=True)
            elif command == "loop":
                while True:
                    patients.get(id=patient)
                    done += 1
                    struct.pack_into("<q", counter, 0, done)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
