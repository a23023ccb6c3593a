"""Masking for log records: a loguru patcher, a stdlib `logging.Filter`, and hcrepo's logger.

`mask_record` masks a loguru record in place before any sink sees it: the message (already
formatted), every `extra` value (nested dicts and lists; a value under a key naming PHI
whole) and the exception, replaced by a masked copy that keeps its traceback. `logger` is
loguru's logger with that patcher: every record hcrepo makes goes through it. An application
masks its own records with `logger.configure(patcher=hcrepo.mask_record)`.

`MaskingFilter` does the same for a stdlib `LogRecord`: the message is formatted from its
arguments, masked and frozen (args emptied, so a later `%d` never meets a mask), and so are
the exception, a traceback text already rendered, the stack and every `extra=` attribute.
A filter on a logger only sees records made on that very logger, not those its children
propagate, so put it on the handlers (`handler.addFilter(hcrepo.MaskingFilter())`).

Not masked: the frame locals loguru prints with `diagnose=True` (values of the application's
own variables on the failing lines; hcrepo's frames never leave it, see `errors.detached`).
Keep `diagnose=False` in production, as loguru advises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loguru import logger as _loguru

from hcrepo.phi.masking import mask, mask_exception
from hcrepo.phi.text import mask_text

if TYPE_CHECKING:
    from loguru import Record


def mask_record(record: Record) -> None:
    """loguru patcher: mask the record's message, extra fields and exception in place."""
    record["message"] = mask_text(record["message"])
    extra = record["extra"]
    masked = mask(dict(extra))
    extra.clear()
    extra.update(masked)
    exception = record["exception"]
    if exception is not None and exception.value is not None:
        record["exception"] = exception._replace(value=mask_exception(exception.value))


logger = _loguru.patch(mask_record)

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


class MaskingFilter(logging.Filter):
    """stdlib filter: mask a record's message, arguments, exception, stack and extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_text(_message(record))
        record.args = None
        if record.exc_info is not None and record.exc_info[1] is not None:
            kind, error, traceback = record.exc_info
            record.exc_info = (kind, mask_exception(error), traceback)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        extras = {name: value for name, value in vars(record).items() if name not in _STANDARD}
        for name, value in mask(extras).items():
            setattr(record, name, value)
        return True


def _message(record: logging.LogRecord) -> str:
    """The record's message as a handler would format it, from masked parts where it can."""
    msg = record.msg if isinstance(record.msg, str) else mask(record.msg)
    if not record.args:
        return str(msg)
    args: tuple[object, ...] | Mapping[str, object] = mask(record.args)
    try:
        return str(msg) % args
    except (TypeError, ValueError):  # a placeholder that takes no mask ('%d'): text masking
        return record.getMessage()
