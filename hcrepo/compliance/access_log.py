"""The PHI access log: every call of a `phi=True` query, in `audit.access_log` on the primary.

A call appends one tuple to an in-memory queue (time, the call's context, query name,
patient ids, who answered it); nothing else happens on the caller's path. A writer thread
turns the queue into rows and COPYs them to the primary every ACCESS_LOG_FLUSH_INTERVAL, or
as soon as ACCESS_LOG_BATCH_ROWS are waiting, on a connection of its own.

What survives what:
- `Database.close()` writes everything recorded before it (0 lost on a clean stop);
- while the primary cannot take them, rows stay in memory up to ACCESS_LOG_MAX_BUFFERED,
  beyond that they are appended to a spill file (hcrepo.compliance.spill), and all are
  written once the primary answers again; spill files of processes that died are written
  when the next process starts its writer;
- `kill -9` loses what was recorded since the last write: at most one flush interval of
  rows, plus the rows held in memory if the primary was unreachable at the time.

Recording never changes a result and never raises into the caller. Write failures are
counted (`hcrepo_access_log_errors`) and logged by error class and SQLSTATE only: a
server's message about a refused row would quote the row, patient ids included.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple
from uuid import UUID

import psycopg

from hcrepo.compliance.spill import Spill
from hcrepo.config import Settings
from hcrepo.ops import metrics
from hcrepo.phi.logs import logger
from hcrepo.phi.patients import PatientIds, unique
from hcrepo.routing.node import address, libpq_seconds
from hcrepo.tenancy import Context

_COLUMNS = ("recorded_at", "actor_id", "clinic_id", "staff_role", "query", "patient_ids",
            "source", "emergency_reason")
# Binary COPY: rows are dumped by psycopg's C dumpers and parsed without text conversion on
# the server, measured at less than half the cost of text format per row.
_COPY = f"COPY audit.access_log ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_TYPES = ("timestamptz", "uuid", "uuid", "text", "text", "uuid[]", "text", "text")
# A stream is recorded in rows of at most this many patient ids as it is consumed, so a long
# stream neither waits for its end to be logged nor makes one huge row.
STREAM_IDS_PER_ROW = 1000
# A write that takes longer is abandoned (and retried): the writer must not hang on a
# primary that stopped answering mid-COPY.
_TIMEOUT = "SET LOCAL statement_timeout = '30s'"

Entry = tuple[float, Context, str, list[Any], str]
"""What a call appends: (time.time(), context, query, patient ids as read, source)."""


class AccessRow(NamedTuple):
    """One row of audit.access_log, in COPY column order."""

    recorded_at: datetime
    actor_id: UUID | None
    clinic_id: UUID | None
    staff_role: str | None
    query: str
    patient_ids: list[UUID]
    source: str
    emergency_reason: str | None

    def to_json(self) -> list[Any]:
        return [self.recorded_at.timestamp(), _text(self.actor_id), _text(self.clinic_id),
                self.staff_role, self.query, [str(pid) for pid in self.patient_ids],
                self.source, self.emergency_reason]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> AccessRow:
        at, actor, clinic, role, query, ids, source, reason = row
        return cls(datetime.fromtimestamp(at, UTC), _uuid(actor), _uuid(clinic), role, query,
                   [UUID(pid) for pid in ids], source, reason)


def row_of(entry: Entry) -> AccessRow:
    at, context, query, ids, source = entry
    # The role as claimed (None: the actor's membership role applied) and a break-glass's
    # reason (its use is recorded with the role in force in audit.emergency_access).
    role, reason = context.role, context.emergency_reason
    return AccessRow(datetime.fromtimestamp(at, UTC), context.actor_id, context.clinic_id,
                     role, query, _patient_ids(ids, query), source, reason)


def _patient_ids(ids: list[Any], query: str) -> list[UUID]:
    if len(ids) == 1 and isinstance(ids[0], UUID):
        return ids  # the common case (one row, or one argument): nothing to sort out
    found = []
    for value in unique(ids):
        if isinstance(value, UUID):
            found.append(value)
            continue
        try:
            found.append(UUID(str(value)))
        except ValueError:
            # An argument a query declared a patient id that is not one (no conversion is
            # declared for it): the read is still logged, the value never is.
            metrics.ACCESS_LOG_ERRORS.labels(kind="patient_id").inc()
            logger.warning("access log: a patient id of {} is not a UUID; not recorded", query)
    return found


def _text(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def _uuid(value: str | None) -> UUID | None:
    return None if value is None else UUID(value)


class AccessLog:
    """The access log of one `Database`; `None` from `from_settings` when ACCESS_LOG is off."""

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessLog | None:
        return cls(settings) if settings.access_log else None

    def __init__(self, settings: Settings) -> None:
        self._url = settings.database_url
        self._interval = settings.access_log_flush_interval
        self._batch = settings.access_log_batch_rows
        self._max_buffered = settings.access_log_max_buffered
        self._connect_timeout = libpq_seconds(settings.health_timeout)
        target = address(settings.database_url)
        directory = settings.access_log_spill_dir
        self._spill = Spill(directory, target) if directory else None
        self._queue: deque[Entry] = deque()
        self._pending: list[AccessRow] = []  # rows the primary has not taken yet
        self._start_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # a stopping writer and its successor, or close
        self._wake = threading.Event()
        self._stop = threading.Event()  # the running writer's; each writer gets its own
        self._writer: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._outage = False
        self._replay_due = True  # spill files of a previous process, on the first write
        _logs.add(self)

    # -- the caller's path -----------------------------------------------------------------

    def seen(
        self, patients: PatientIds, context: Context, args: Sequence[Any], value: Any,
        source: str,
    ) -> Any:
        """Record a PHI call's result and return it; a stream is returned wrapped, so that
        its rows are recorded as they are consumed, with this call's context."""
        if patients.streams:
            return self._stream(patients, context, args, value, source)
        try:
            ids = patients.of(value, args)
        except Exception:  # a row without the field: log the read, without its ids
            metrics.ACCESS_LOG_ERRORS.labels(kind="patient_id").inc()
            ids = []
        self._append((time.time(), context, patients.query, ids, source))
        return value

    def _append(self, entry: Entry) -> None:
        queue = self._queue
        queue.append(entry)
        if self._writer is None or len(queue) >= self._batch:
            self._kick()

    def _stream(
        self, patients: PatientIds, context: Context, args: Sequence[Any],
        rows: Iterator[Any], source: str,
    ) -> Iterator[Any]:
        row_id = patients.row_id
        query = patients.query
        ids = patients.from_args(args)
        recorded = False
        try:
            for row in rows:
                if row_id is not None:
                    ids.append(row_id(row))
                # Counted before it is handed over: a consumer that stops here has seen it.
                yield row
                if len(ids) >= STREAM_IDS_PER_ROW:
                    self._append((time.time(), context, query, ids, source))
                    ids, recorded = [], True
        finally:
            if ids or not recorded:
                self._append((time.time(), context, query, ids, source))
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # dropped early: the cursor is cleaned up now

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Start the writer (it first writes spill files that processes left behind)."""
        self._kick()

    def _kick(self) -> None:
        if self._writer is None:
            with self._start_lock:
                if self._writer is None:
                    self._stop = threading.Event()
                    writer = threading.Thread(target=self._run, args=(self._stop,),
                                              name="hcrepo-access-log", daemon=True)
                    writer.start()
                    self._writer = writer
                    return
        self._wake.set()

    def close(self) -> None:
        """Write everything recorded so far (spilling what the primary does not take), then
        stop the writer. A record made after this starts a new writer."""
        with self._start_lock:
            writer, self._writer, stop = self._writer, None, self._stop
        if writer is not None:
            stop.set()
            self._wake.set()
            writer.join()
        with self._flush_lock:
            if self._queue or self._pending:  # recorded while the writer was stopping
                self._flush(final=True)
            self._disconnect()
            if self._spill is not None:
                self._spill.close()

    # -- the writer ------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = stop.is_set()
            with self._flush_lock:
                self._flush(final=stopping)
            if stopping:
                return

    def _flush(self, *, final: bool) -> None:
        """One write: spill files due, then everything waiting. Never raises."""
        try:
            self._take()
            if self._pending or self._replay_due:
                self._deliver()
        except Exception as exc:  # a bug here must not stop the writer: count, keep rows
            metrics.ACCESS_LOG_ERRORS.labels(kind="writer").inc()
            logger.error("access log writer failed ({}); {} rows kept", type(exc).__name__,
                         len(self._pending))
        if self._pending and (final or len(self._pending) > self._max_buffered):
            self._spill_pending(final=final)
        metrics.ACCESS_LOG_WAITING.set(len(self._pending) + len(self._queue))

    def _take(self) -> None:
        queue, pending = self._queue, self._pending
        for _ in range(len(queue)):
            pending.append(row_of(queue.popleft()))

    def _deliver(self) -> None:
        try:
            conn = self._connection()
            if self._replay_due and self._spill is not None:
                self._replay(conn)
            self._replay_due = False
            if self._pending:
                self._copy(conn, self._pending)
                metrics.ACCESS_LOG_ROWS.labels(outcome="written").inc(len(self._pending))
                self._pending = []
        except psycopg.Error as exc:
            self._failed(exc)
            return
        if self._outage:
            self._outage = False
            logger.info("access log: the primary takes rows again")

    def _replay(self, conn: psycopg.Connection[Any]) -> None:
        assert self._spill is not None
        for spilled in self._spill.claim():
            try:
                lines, torn = spilled.lines()
                rows = [AccessRow.from_json(line) for line in lines]
                self._copy(conn, rows)
            except BaseException:
                spilled.release()
                raise
            spilled.remove()
            metrics.ACCESS_LOG_ROWS.labels(outcome="replayed").inc(len(rows))
            if torn:
                metrics.ACCESS_LOG_ERRORS.labels(kind="torn").inc(torn)
                logger.warning("access log: {} spilled row(s) were cut short by a crash and "
                               "could not be read", torn)

    def _copy(self, conn: psycopg.Connection[Any], rows: Sequence[AccessRow]) -> None:
        with conn.cursor() as cursor:
            # Transaction-local, so that it holds behind PgBouncer too (invariant 2).
            cursor.execute(_TIMEOUT)
            with cursor.copy(_COPY) as copy:
                copy.set_types(list(_TYPES))
                for row in rows:
                    copy.write_row(row)
        conn.commit()

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = psycopg.connect(self._url,
                                                connect_timeout=self._connect_timeout)
        return conn

    def _failed(self, exc: psycopg.Error) -> None:
        self._disconnect()
        metrics.ACCESS_LOG_ERRORS.labels(kind="write").inc()
        self._replay_due = True  # whatever spills meanwhile goes out on the next success
        if not self._outage:
            self._outage = True
            # Class and SQLSTATE only: the server's message may quote a row (invariant 7).
            logger.warning(
                "access log: cannot write to the primary ({}{}); rows are kept in memory "
                "(ACCESS_LOG_MAX_BUFFERED={}), then spilled, and written when it answers",
                type(exc).__name__, f", SQLSTATE {exc.sqlstate}" if exc.sqlstate else "",
                self._max_buffered,
            )

    def _spill_pending(self, *, final: bool) -> None:
        rows, self._pending = self._pending, []
        if self._spill is None:
            # Nowhere to keep them: the oldest beyond the bound (all of them on close) go.
            keep = 0 if final else self._max_buffered
            dropped, self._pending = rows[:len(rows) - keep], rows[len(rows) - keep:]
            metrics.ACCESS_LOG_ROWS.labels(outcome="dropped").inc(len(dropped))
            logger.error("access log: {} row(s) dropped: the primary cannot take them and "
                         "ACCESS_LOG_SPILL_DIR is not set", len(dropped))
            return
        try:
            self._spill.append([row.to_json() for row in rows])
        except OSError as exc:
            metrics.ACCESS_LOG_ERRORS.labels(kind="spill").inc()
            logger.error("access log: cannot write the spill file in ACCESS_LOG_SPILL_DIR ({}, "
                         "errno {}); {} row(s) kept in memory", type(exc).__name__, exc.errno,
                         len(rows))
            self._pending = rows + self._pending
            return
        metrics.ACCESS_LOG_ROWS.labels(outcome="spilled").inc(len(rows))
        self._replay_due = True

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _forget_process_state(self) -> None:
        """In a forked child: the parent's rows, writer, connection and spill file are the
        parent's. Its connection is kept unreferenced-but-alive so that closing it here does
        not end the parent's session."""
        self._queue.clear()
        self._pending = []
        self._start_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._writer = None
        if self._conn is not None:
            _inherited.append(self._conn)
            self._conn = None
        if self._spill is not None:
            self._spill.forget()


_logs: weakref.WeakSet[AccessLog] = weakref.WeakSet()
_inherited: list[psycopg.Connection[Any]] = []


def _after_fork_in_child() -> None:
    for log in list(_logs):
        log._forget_process_state()


def _close_at_exit() -> None:
    # A process that ends without db.close() still writes (or spills) what it recorded.
    for log in list(_logs):
        log.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
