"""What masking costs, single thread, medians of interleaved short slices (no servers).

- a log record through loguru into a sink that formats it: loguru's own logger vs hcrepo's
  masking logger (the slow-query warning, and a record with a nested `extra` dict);
- a stdlib record through a handler that formats it, without and with `MaskingFilter`;
- `repr()` of a patient row: a plain pydantic model vs the healthcare `Patient` (PhiModel).
"""

from __future__ import annotations

import datetime
import logging
import sys
import uuid
from typing import Any

from loguru import logger
from pydantic import BaseModel, ConfigDict

from benchmarks.harness import interleaved, table
from hcrepo import MaskingFilter
from hcrepo.healthcare import Patient
from hcrepo.phi.logs import logger as masking_logger

SLOW = "slow query {query} ({source}) took {ms:.1f} ms"
EXTRA = {"request_id": "r-1", "patient": {"first_name": "Ada", "email": "ada@example.org"}}


class PlainPatient(BaseModel):
    model_config = ConfigDict(frozen=True)
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


class _Formatting(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


def _loguru() -> str:
    sink = logger.add(lambda message: None, format="{time} {level} {name}:{line} {message} "
                      "{extra}", level="DEBUG")
    try:
        def slow(log: Any) -> None:
            log.warning(SLOW, query="get_patient", source="sql/patients.sql:3", ms=512.3)

        def extra(log: Any) -> None:
            log.bind(**EXTRA).info("loaded patient {}", 7)

        medians = interleaved({
            "loguru, slow-query warning": lambda: slow(logger),
            "hcrepo's masking logger, slow-query warning": lambda: slow(masking_logger),
            "loguru, nested extra": lambda: extra(logger),
            "hcrepo's masking logger, nested extra": lambda: extra(masking_logger),
        }, rounds=40, calls_per_slice=200)
    finally:
        logger.remove(sink)
    return table(medians, "loguru, slow-query warning",
                 "A log record through loguru (formatting sink)")


def _stdlib() -> str:
    plain, masked = logging.getLogger("bench.plain"), logging.getLogger("bench.masked")
    for log, filtered in ((plain, False), (masked, True)):
        handler = _Formatting()
        if filtered:
            handler.addFilter(MaskingFilter())
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
    medians = interleaved({
        "stdlib handler": lambda: plain.info("patient %s seen %d times", {"ssn": "1"}, 3),
        "stdlib handler + MaskingFilter":
            lambda: masked.info("patient %s seen %d times", {"ssn": "1"}, 3),
    }, rounds=40, calls_per_slice=200)
    return table(medians, "stdlib handler", "A stdlib record through a formatting handler")


def _repr() -> str:
    now = datetime.datetime.now(datetime.UTC)
    values: dict[str, Any] = {
        "id": uuid.uuid4(), "clinic_id": uuid.uuid4(), "mrn": "N-0001", "first_name": "Ada",
        "last_name": "Lovelace", "date_of_birth": datetime.date(1815, 12, 10), "sex": "female",
        "phone": "+1 555 010 0199", "email": "ada@example.org", "address": "1 Main St",
        "ssn": "123-45-6789", "created_at": now, "updated_at": now,
    }
    plain, masked = PlainPatient(**values), Patient(**values)
    medians = interleaved({"pydantic BaseModel": lambda: repr(plain),
                           "PhiModel (Patient)": lambda: repr(masked)},
                          rounds=40, calls_per_slice=200)
    return table(medians, "pydantic BaseModel", "repr() of a patient row")


def main() -> str:
    logger.remove()  # loguru's default stderr sink would print (and time) every record
    try:
        return "\n\n".join([_loguru(), _stdlib(), _repr()])
    finally:
        logger.add(sys.stderr)


if __name__ == "__main__":
    print(main())
