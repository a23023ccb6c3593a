"""Every repository call is measured in one place: latency, errors, slow-query log, no PHI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger

from hcrepo import UniqueViolation
from tests.support.repos import Clinic, Clinical, MakeDatabase

FAKE_PHONE = "+1 555 0199 PHI-MARKER"


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    yield lines
    logger.remove(sink)


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_calls_are_counted_timed_and_slow_ones_logged_without_values(
    make_db: MakeDatabase, clinic: Clinic, log_lines: list[str]
) -> None:
    db = make_db(slow_query_threshold_ms=0.001)  # every call is "slow"
    before = _sample(db.metrics(), "hcrepo_query_seconds_count", query="set_phone", kind="write")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        assert Clinical(db).set_phone(id=clinic.patient_ids[0], phone=FAKE_PHONE) == 1
        assert Clinical(db).patient(id=clinic.patient_ids[0]) is not None
    text = db.metrics()
    assert _sample(text, "hcrepo_query_seconds_count", query="set_phone", kind="write") == (
        before + 1
    )
    assert _sample(text, "hcrepo_query_seconds_count", query="patient", kind="read") >= 1
    slow = [line for line in log_lines if "slow query set_phone" in line]
    assert len(slow) == 1 and "clinical.sql:" in slow[0]
    assert all(FAKE_PHONE not in line for line in log_lines)
    assert FAKE_PHONE not in text


def test_a_fast_call_is_not_logged_and_errors_are_counted_by_class(
    make_db: MakeDatabase, clinic: Clinic, log_lines: list[str]
) -> None:
    db = make_db(slow_query_threshold_ms=60_000)
    mrn = f"dup-{clinic.id.hex[:8]}"
    errors = _sample(db.metrics(), "hcrepo_query_errors_total", query="add_patient",
                     error="UniqueViolation")
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        Clinical(db).add_patient(clinic_id=clinic.id, mrn=mrn)
        with pytest.raises(UniqueViolation):
            Clinical(db).add_patient(clinic_id=clinic.id, mrn=mrn)
    assert _sample(db.metrics(), "hcrepo_query_errors_total", query="add_patient",
                   error="UniqueViolation") == errors + 1
    assert not [line for line in log_lines if "slow query" in line]
