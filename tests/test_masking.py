"""`hcrepo.mask`, the loguru patcher and the stdlib filter, without servers: what they mask
(nested, in lists, in exceptions, in extras, in other spellings) and what they leave alone
(UUIDs, timestamps, counts: the rest of a log line)."""

from __future__ import annotations

import io
import logging
import re
import threading
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest
from loguru import logger
from pydantic import BaseModel
from pydantic._internal._model_construction import ModelMetaclass

import hcrepo
from hcrepo import PHI, MaskingFilter, PhiModel, mask, mask_record
from hcrepo.ops import driver_logs
from hcrepo.phi.logs import logger as hcrepo_logger
from hcrepo.phi.names import forget, phi_keys
from hcrepo.phi.text import mask_text

SSN_SPELLINGS = ["123-45-6789", "123 45 6789", "123456789"]
EMAILS = ["ada.lovelace+clinic@example.org", "A_B@mail.example.co.uk"]
PHONES = ["+1 555 010 0199", "+44 20 7946 0958", "(555) 010-0199", "555-010-0199",
          "555.010.0199", "+15550100199"]
BIRTH_DATES = ["1980-01-31", "1980/01/31", "01/31/1980", "31.01.1980", "Jan 31, 1980",
               "31 January 1980", "datetime.date(1980, 1, 31)"]
# Parts of log lines that look like numbers but are not PHI.
NOT_PHI = [
    "00000000-0000-4000-8000-00000000d3e0", str(uuid.UUID(int=123456789)),
    "2026-12-01 23:12:11.123456+00:00", "2026-12-01T23:12:11Z", "2030-01-07T09:00:00+00:00",
    "23:12:11", "0/3000060", "took 12.5 ms", "pid 1234567", "127.0.0.1:5432",
    "192.168.100.200", "epoch 1764630731", "1764630731123 ms", "+0000", "v1.2.3",
    "slow query get_patient (sql/patients.sql:12) took 0.4 ms", "HCREPO_POOL_MAX=10",
    "sqlstate 23505", "attempt 3 of 5", "batch 1000/12000",
]


def marker() -> str:
    return f"PHI{uuid.uuid4().hex[:12]}"


# --- free text ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", SSN_SPELLINGS + EMAILS + PHONES + BIRTH_DATES)
def test_values_found_by_their_shape_are_masked_in_free_text(value: str) -> None:
    masked = mask_text(f"patient record ({value}) updated")
    assert value not in masked
    assert masked == "patient record (***) updated"


@pytest.mark.parametrize("text", NOT_PHI)
def test_uuids_timestamps_and_numbers_of_log_lines_are_left_alone(text: str) -> None:
    assert mask_text(text) == text
    assert mask_text(f"[{text}]") == f"[{text}]"


@pytest.mark.parametrize("label", [
    "SSN", "ssn", "Ssn", "first_name", "FIRST_NAME", "firstName", "First-Name", "first name",
    "last_name", "dob", "DOB", "Date of Birth", "date_of_birth", "mrn", "MRN", "email",
    "E-mail", "phone", "address", "note", "notes", "name", "full_name",
])
@pytest.mark.parametrize("template", [
    "{label}={value} next=1", "{label}: {value}, next=1", "'{label}': '{value}', 'next': 1",
    '"{label}": "{value}", "next": 1', "{label}='{value}' next=1",
])
def test_a_labelled_value_is_masked_in_every_spelling(label: str, template: str) -> None:
    value = marker()
    masked = mask_text(template.format(label=label, value=value))
    assert value not in masked
    assert "next" in masked and "1" in masked  # the rest of the line is kept


def test_a_labelled_value_with_spaces_runs_to_the_end_of_its_clause() -> None:
    assert mask_text("SSN: 123 45 6789") == "SSN: ***"
    assert mask_text("Name: Ada Lovelace, MRN: N-0001; seen") == "Name: ***, MRN: ***; seen"
    assert mask_text("'dob': datetime.date(1980, 1, 31), 'id': 7") == "'dob': ***, 'id': 7"


def test_what_postgresql_echoes_in_a_message_is_masked_and_the_message_kept() -> None:
    value = marker()
    messages = {
        f"duplicate key value violates unique constraint \"patients_mrn\"\n"
        f"DETAIL:  Key (clinic_id, mrn)=(7a, {value}) already exists.":
            "DETAIL:  Key (clinic_id, mrn)=(***) already exists.",
        f"new row violates check constraint\nDETAIL:  Failing row contains (1, {value}, x).":
            "DETAIL:  Failing row contains (***).",
        f'invalid input syntax for type uuid: "{value}"':
            'invalid input syntax for type uuid: "***"',
    }
    for message, kept in messages.items():
        masked = mask_text(message)
        assert value not in masked and kept in masked


def test_masking_twice_changes_nothing_more() -> None:
    once = mask_text(str({"ssn": "123-45-6789", "id": 3}))
    assert mask_text(once) == once == "{'ssn': ***, 'id': 3}"


# --- objects --------------------------------------------------------------------------------


class Plain(BaseModel):
    """An application model that is not a PhiModel: masked by its markers and its names."""

    id: int
    first_name: str
    chart_code: Annotated[str, PHI()]
    born: date


def test_mask_masks_dicts_and_lists_nested_at_any_depth() -> None:
    value = marker()
    data: dict[str, Any] = {"visit": [{"patient": {"contact": [{"EMAIL": value, "kind": "home"}]}}],
            "count": 2, "when": datetime(2030, 1, 1, tzinfo=UTC), "absent": None,
            "Phone": None, "tags": ("a", "x.y@example.org"), "set": frozenset({"b"})}
    masked = mask(data)
    assert value not in repr(masked)
    assert masked["visit"][0]["patient"]["contact"][0] == {"EMAIL": "***", "kind": "home"}
    assert masked["count"] == 2 and masked["when"] == data["when"]
    assert masked["absent"] is None and masked["Phone"] is None  # absent, not hidden
    assert masked["tags"] == ("a", "***") and masked["set"] == frozenset({"b"})
    assert data["visit"][0]["patient"]["contact"][0]["EMAIL"] == value  # a copy


def test_a_whole_value_under_a_phi_key_is_masked_whatever_it_is() -> None:
    value = marker()
    masked = mask({"address": {"street": "x", "city": value}, "notes": [value, value],
                   "date_of_birth": date(1980, 1, 31)})
    assert masked == {"address": "***", "notes": "***", "date_of_birth": "***"}


def test_mask_of_a_model_is_a_dict_with_its_marked_and_named_fields_masked() -> None:
    code, name = marker(), marker()
    row = Plain(id=7, first_name=name, chart_code=code, born=date(1980, 1, 31))
    assert mask(row) == {"id": 7, "first_name": "***", "chart_code": "***",
                         "born": date(1980, 1, 31)}
    assert row.chart_code == code  # the model is untouched
    assert mask([row, {"row": row}]) == [mask(row), {"row": mask(row)}]


def test_a_field_marked_phi_names_phi_in_dicts_and_text_too() -> None:
    value = marker()
    assert mask({"chart_code": value}) == {"chart_code": "***"}
    assert value not in mask_text(f"chart_code={value}")


def test_a_phi_model_defined_later_adds_its_field_names() -> None:
    value, field = marker(), f"late_{uuid.uuid4().hex[:8]}"
    assert mask({field: value}) == {field: value}
    model: type[PhiModel] = type(
        "Late", (PhiModel,), {"__annotations__": {field: Annotated[str, PHI()]}})
    assert model.model_fields[field]
    assert mask({field: value}) == {field: "***"}


def test_a_model_met_again_does_not_walk_the_models_again() -> None:
    class Camel(BaseModel):
        chartId: Annotated[str, PHI()]

    assert mask(Camel(chartId="x")) == {"chartId": "***"}
    known = phi_keys()
    assert "chart_id" in known
    mask(Camel(chartId="y"))
    assert phi_keys() is known


def test_cycles_and_shared_objects_are_masked_once() -> None:
    shared = {"ssn": "123-45-6789"}
    loop: dict[str, Any] = {"a": shared, "b": shared}
    loop["self"] = loop
    masked = mask(loop)
    assert masked["self"] is masked and masked["a"] is masked["b"]
    assert masked["a"] == {"ssn": "***"}


class Raised(Exception):
    """An application error whose __init__ takes other arguments than it stores."""

    def __init__(self, message: str, *, patient: dict[str, str]) -> None:
        super().__init__(message)
        self.patient = patient


def test_an_exception_is_copied_as_its_class_with_args_attributes_notes_and_chain_masked(
) -> None:
    ssn, email, note = "123-45-6789", "x.y@example.org", marker()
    try:
        try:
            raise KeyError(f"no chart for {email}")
        except KeyError as inner:
            error = Raised(f"SSN {ssn} rejected", patient={"note": note})
            error.add_note(f"contact {email}")
            raise error from inner
    except Raised as caught:
        original = caught
    copy = mask(original)
    assert type(copy) is Raised and copy is not original
    assert str(copy) == "SSN *** rejected" and copy.patient == {"note": "***"}
    assert copy.__notes__ == ["contact ***"]
    assert type(copy.__cause__) is KeyError and email not in str(copy.__cause__)
    assert copy.__traceback__ is original.__traceback__
    printed = "".join(traceback.format_exception(copy))
    assert all(v not in printed for v in (ssn, email, note)) and "Raised" in printed
    assert str(original) == f"SSN {ssn} rejected"  # the original is untouched


def test_an_exception_group_is_masked_with_every_member() -> None:
    group = ExceptionGroup("batch for x.y@example.org", [ValueError("SSN 123-45-6789"),
                                                         KeyError("kept")])
    copy = mask(group)
    printed = "".join(traceback.format_exception(copy))
    assert type(copy) is ExceptionGroup and len(copy.exceptions) == 2
    assert "x.y@example.org" not in printed and "123-45-6789" not in printed
    assert "ValueError: SSN ***" in printed and "KeyError: 'kept'" in printed


def test_an_exception_that_cannot_be_rebuilt_is_replaced_by_a_masked_stand_in() -> None:
    class Stubborn(Exception):
        def __new__(cls, *args: object, code: int) -> Stubborn:
            return super().__new__(cls, *args)

        def __init__(self, *args: object, code: int) -> None:
            super().__init__(*args)

    value = "x.y@example.org"
    copy = mask(Stubborn(f"for {value}", code=1))
    assert value not in str(copy) and "Stubborn" in str(copy)


# --- loguru ---------------------------------------------------------------------------------


@pytest.fixture
def loguru_sink() -> Iterator[io.StringIO]:
    sink = io.StringIO()
    handler = logger.add(sink, level="TRACE", backtrace=True, diagnose=False, colorize=False,
                         format="{message} | {extra} | {exception}")
    yield sink
    logger.remove(handler)


def test_the_patcher_masks_message_extra_and_exception(loguru_sink: io.StringIO) -> None:
    ssn, email, note = "123-45-6789", "x.y@example.org", marker()
    masked = logger.patch(mask_record)
    try:
        raise ValueError(f"bad SSN {ssn}")
    except ValueError:
        masked.bind(patient={"note": note, "visits": [{"EMAIL": email}]}, request="r1").opt(
            exception=True).info("mail to {} for {}", email, {"ssn": ssn})
    printed = loguru_sink.getvalue()
    assert all(v not in printed for v in (ssn, email, note)), printed
    assert "'request': 'r1'" in printed and "ValueError: bad SSN ***" in printed


def test_hcrepo_logs_through_the_patcher(loguru_sink: io.StringIO) -> None:
    value = "x.y@example.org"
    hcrepo_logger.warning("cache refresh for {} failed", value)
    hcrepo_logger.opt(depth=0).bind(ssn="123-45-6789").info("x")
    assert loguru_sink.getvalue().splitlines() == [
        "cache refresh for *** failed | {} | ", "x | {'ssn': '***'} | ",
    ]


def test_an_application_installs_the_patcher_on_its_own_logger(
    loguru_sink: io.StringIO,
) -> None:
    value = marker()
    logger.configure(patcher=hcrepo.mask_record)
    try:
        logger.info("row {}", {"first_name": value})
        logger.bind(mrn=value).info("by key")
    finally:
        logger.configure(patcher=lambda record: None)
    assert value not in loguru_sink.getvalue()


def test_loguru_with_diagnose_prints_no_masked_model_value(loguru_sink: io.StringIO) -> None:
    """diagnose prints the values of the failing line's variables: a PhiModel shows masked."""
    value = marker()
    sink = io.StringIO()
    handler = logger.add(sink, backtrace=True, diagnose=True, colorize=False)
    row = Patientish(mrn=value)
    try:
        raise LookupError(row)
    except LookupError:
        hcrepo_logger.exception("lookup failed")
    finally:
        logger.remove(handler)
    assert value not in sink.getvalue() and "mrn='***'" in sink.getvalue()


class Patientish(PhiModel):
    mrn: Annotated[str, PHI()]


# --- stdlib logging -------------------------------------------------------------------------


@pytest.fixture
def stdlib_stream() -> Iterator[io.StringIO]:
    """A root handler with the filter, as an application installs it; records of child
    loggers reach it by propagation."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s %(patient)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_the_filter_masks_msg_args_extra_and_exception(stdlib_stream: io.StringIO) -> None:
    ssn, email, note = "123-45-6789", "x.y@example.org", marker()
    log = logging.getLogger(f"app.{uuid.uuid4().hex[:6]}")
    log.info("contact %s, %d visits", {"email": email}, 3, extra={"patient": {"note": note}})
    log.info("by name %(first_name)s", {"first_name": note}, extra={"patient": [{"note": note}]})
    log.info({"ssn": ssn}, extra={"patient": None})
    try:
        raise ValueError(f"SSN {ssn}")
    except ValueError:
        log.exception("failed for %s", email, extra={"patient": "-"})
    printed = stdlib_stream.getvalue()
    assert all(v not in printed for v in (ssn, email, note)), printed
    assert "contact {'email': '***'}, 3 visits {'note': '***'}" in printed
    assert "ValueError: SSN ***" in printed


def test_the_filter_keeps_a_message_whose_placeholder_takes_no_mask(
    stdlib_stream: io.StringIO,
) -> None:
    logging.getLogger("app").info("%d patients, ssn=%s", 3, "123-45-6789",
                                  extra={"patient": "-"})
    assert stdlib_stream.getvalue() == "app 3 patients, ssn=*** -\n"


def test_the_filter_masks_an_already_rendered_traceback() -> None:
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "x", None, None)
    record.exc_text = "Traceback ...\nValueError: for x.y@example.org"
    record.stack_info = "File 'a.py', line 3, in f\n    f(ssn='123-45-6789')"
    assert MaskingFilter().filter(record)
    assert "x.y@example.org" not in record.exc_text
    assert "123-45-6789" not in record.stack_info


def test_psycopg_records_reach_loguru_masked(loguru_sink: io.StringIO) -> None:
    driver_logs.route(hcrepo_logger)  # as the first node does
    logging.getLogger("psycopg.pool").warning("connection for %s failed", "x.y@example.org")
    assert loguru_sink.getvalue() == "psycopg.pool: connection for *** failed | {} | \n"


def test_every_hcrepo_module_logs_through_the_masking_logger() -> None:
    """A module importing loguru's logger itself would log unmasked."""
    package = Path(hcrepo.__file__).parent
    allowed = {package / "phi" / "logs.py", package / "ops" / "driver_logs.py"}
    direct = [path for path in package.rglob("*.py")
              if re.search(r"^from loguru import logger\b", path.read_text(), re.M)
              and path not in allowed]
    assert direct == []


@pytest.mark.parametrize("value", ["+33 1 23 45 67 89", "+1 (555) 010 019"])
def test_an_international_phone_number_without_four_digits_in_a_row_is_masked(
    value: str,
) -> None:
    assert mask_text(f"call {value} now") == "call *** now"


def test_a_model_defined_while_another_thread_walks_the_models_is_not_lost() -> None:
    """The walk that began before the model existed must not be kept as the answer."""
    walking, defined = threading.Event(), threading.Event()

    class Pausing(ModelMetaclass):
        def __subclasses__(cls) -> list[type]:
            if threading.current_thread().name == "walker" and not walking.is_set():
                walking.set()
                assert defined.wait(10)
            return super().__subclasses__()

    class Paused(PhiModel, metaclass=Pausing):  # the walk has listed PhiModel's subclasses
        pass

    forget()
    walker = threading.Thread(target=phi_keys, name="walker")
    walker.start()
    assert walking.wait(10)
    field = f"late_{uuid.uuid4().hex[:8]}"
    type("During", (PhiModel,), {"__annotations__": {field: Annotated[str, PHI()]}})
    defined.set()
    walker.join(10)
    assert not walker.is_alive() and Paused is not None
    assert field in phi_keys()
