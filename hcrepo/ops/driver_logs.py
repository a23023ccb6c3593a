"""psycopg's and psycopg_pool's log records, delivered to loguru: one format for one process.

hcrepo logs through loguru; the driver logs through stdlib `logging` (loggers `psycopg` and
`psycopg.pool`). `route()` puts one handler on the `psycopg` logger that hands each record
to loguru, prefixed with the logger's name, at the record's level and from the driver's own
line, through the logger `route` is given (hcrepo's own, which masks PHI). It is installed
once per process, when hcrepo builds its first node.

- Level: a `psycopg` logger left at NOTSET is set to WARNING, so the pool's warnings (a
  failed connection attempt, a broken connection discarded) arrive and its per-checkout INFO
  records cost one level check; a level the application set is kept.
- The records do not also propagate to the root logger, which would print them a second
  time in stdlib's format. An application that wants them in stdlib `logging` instead
  removes `HANDLER` from `logging.getLogger("psycopg")` and sets `propagate` back.
- A record's traceback is not forwarded: loguru's `diagnose` would print the frame locals of
  the driver's internals, which can hold a statement's parameters.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from loguru import logger as _loguru

if TYPE_CHECKING:
    from loguru import Logger

_DRIVER = "psycopg"
_lock = threading.Lock()


class _ToLoguru(logging.Handler):
    into: Logger = _loguru

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = self.into.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Attribute the record to the driver's line, not to the logging machinery.
        frame: FrameType | None = sys._getframe()
        depth = 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        self.into.opt(depth=depth).log(level, "{}: {}", record.name, record.getMessage())


HANDLER = _ToLoguru()


def route(into: Logger) -> None:
    """Install the handler on the `psycopg` logger unless it is there already; records go
    to `into` (ops imports nothing of hcrepo, so the masking logger is handed in)."""
    driver = logging.getLogger(_DRIVER)
    with _lock:
        HANDLER.into = into
        if HANDLER in driver.handlers:
            return
        if driver.level == logging.NOTSET:
            driver.setLevel(logging.WARNING)
        driver.addHandler(HANDLER)
        driver.propagate = False
