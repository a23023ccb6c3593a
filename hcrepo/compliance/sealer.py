"""The sealer: links committed audit rows into each clinic's hash chain, shortly after commit.

Why a sealer and not a link computed by the writing transaction: a link needs its
predecessor's hash, so computing it at write time makes every write of a clinic wait, until
COMMIT, for every other in-flight write of that clinic (the lock is the chain's head). The
sealer instead runs audit.seal every AUDIT_SEAL_INTERVAL: a definer function that takes a
transaction-scoped advisory lock with try-lock (one sealer at a time, any number of
processes may run one, none ever waits) and appends links for the committed rows it finds.
Writers never wait for it; the price is that a row is unchained for one interval plus the
seal's own time, which benchmarks/bench_audit.py measures.

The thread has its own connection (autocommit, no prepared statements, so that PgBouncer in
transaction mode passes it) and never touches the pools.
"""

from __future__ import annotations

import threading
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hcrepo.phi.logs import logger

# Rows per audit.seal call: one call's transaction stays short under a bulk load.
BATCH = 10_000
# Partitions are made this many months ahead at start and every PARTITION_EVERY seconds.
MONTHS_AHEAD = 3
PARTITION_EVERY = 3600.0
# How long close() spends on the final seal, at most.
FINAL_SEAL_TIMEOUT = 10.0


def seal_pending(conn: psycopg.Connection, *, deadline: float | None = None) -> int:
    """Seal until nothing committed is left unchained (or another sealer holds the lock, or
    `deadline`, a time.monotonic() value, passes); return how many rows were linked."""
    total = 0
    while True:
        row = conn.execute("SELECT audit.seal(%s)", [BATCH]).fetchone()
        sealed = int(row[0]) if row else 0
        total += sealed
        if sealed < BATCH or (deadline is not None and time.monotonic() > deadline):
            return total


def ensure_partitions(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT audit.ensure_partitions(%s)", [MONTHS_AHEAD]).fetchone()
    return int(row[0]) if row else 0


class Sealer:
    """A daemon thread calling audit.seal every `interval` seconds on its own connection."""

    def __init__(self, url: str, interval: float, *, connect_timeout: float = 10.0) -> None:
        params = {key: str(value) for key, value in conninfo_to_dict(url).items()}
        params.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
        params.setdefault("application_name", "hcrepo-audit-sealer")
        self._conninfo = make_conninfo("", **params)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._partitioned_at = float("-inf")
        self._failing: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hcrepo-audit-sealer",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = FINAL_SEAL_TIMEOUT) -> None:
        """Stop the thread after one last seal, so that a clean shutdown leaves nothing this
        process wrote unchained."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self._cycle(None)
            self._cycle(time.monotonic() + FINAL_SEAL_TIMEOUT)
        finally:
            if self._conn is not None:
                self._conn.close()

    def _cycle(self, deadline: float | None) -> None:
        try:
            conn = self._connection()
            if time.monotonic() - self._partitioned_at > PARTITION_EVERY:
                ensure_partitions(conn)
                self._partitioned_at = time.monotonic()
            seal_pending(conn, deadline=deadline)
        except psycopg.Error as exc:
            self._failed(exc)
        else:
            if self._failing is not None:
                logger.info("audit sealer: sealing again")
                self._failing = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=None)
        return self._conn

    def _failed(self, exc: psycopg.Error) -> None:
        # The SQLSTATE and class only (invariant 7); logged once per kind of failure.
        kind = f"{type(exc).__name__} [{exc.sqlstate or '?'}]"
        if kind != self._failing:
            logger.warning("audit sealer: seal failed, retrying every interval: {}", kind)
            self._failing = kind
        if self._conn is not None and self._conn.broken:
            self._conn.close()
