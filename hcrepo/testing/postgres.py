"""A throw-away PostgreSQL primary and its hot-standby streaming replicas (pg_basebackup).

The clusters trade durability for speed (fsync, full_page_writes off): they hold nothing
worth keeping. `synchronous_commit` stays on, though: with it off, `pg_current_wal_lsn()`
right after COMMIT can lag the commit record, and every "wait until the replica has
replayed my write" check would race.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self
from urllib.parse import quote

import psycopg

from hcrepo.testing.base import ThrowAwayServer
from hcrepo.testing.binaries import pg_bindir
from hcrepo.testing.errors import EmbeddedServerError
from hcrepo.testing.ports import LOOPBACK
from hcrepo.testing.processes import (
    START_TIMEOUT,
    as_service_user,
    hand_over,
    run,
    server_env,
    tail,
)


def _conf_value(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_hba() -> str:
    # Unix sockets live in the server's private directory: trust there is safe and lets
    # pg_ctl check readiness. TCP always asks for the password, replication included.
    return (
        "local all all trust\n"
        "local replication all trust\n"
        f"host all all {LOOPBACK}/32 scram-sha-256\n"
        f"host replication all {LOOPBACK}/32 scram-sha-256\n"
    )


def _primary_conf(extra: Mapping[str, str]) -> dict[str, str]:
    return {
        "listen_addresses": LOOPBACK,
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        # Keeps WAL around for a replica that a failure test stopped for a while.
        "wal_keep_size": "256MB",
        "hot_standby": "on",
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "all",
        "fsync": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        **extra,
    }


class PostgresServer(ThrowAwayServer):
    """A throw-away PostgreSQL cluster on 127.0.0.1:<port> in a temp dir.

    `start()` runs initdb the first time (or pg_basebackup for a replica made by
    `create_replica`), then `pg_ctl start`; `close()` stops it and deletes its directory,
    together with the replicas made from it. Used as a context manager it is started on
    entry and closed on exit. Methods are safe to call from several threads.
    """

    data_dir: Path
    superuser_password: str
    _what = "PostgreSQL server"

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        superuser_password: str = "hcrepo-test",
        extra_conf: Mapping[str, str] | None = None,
    ) -> None:
        """Reserve a port and a directory (`hcrepo-pg-*` inside base_dir, default /tmp)."""
        super().__init__(prefix="hcrepo-pg-", port=port, base_dir=base_dir)
        self.superuser_password = superuser_password
        self._base_dir = base_dir
        self._extra_conf = dict(extra_conf or {})
        self.data_dir = self._root / "data"
        self._socket_dir = self._root / "sock"
        self._log_file = self._root / "postgres.log"
        self._primary: PostgresServer | None = None
        self._replicas: list[PostgresServer] = []
        self._initialized = False

    def __repr__(self) -> str:
        role = "replica" if self._primary is not None else "primary"
        return f"<{type(self).__name__} {role} {self.host}:{self.port} {self._state()}>"

    @property
    def primary(self) -> PostgresServer | None:
        """The server this one streams from, or None for a primary."""
        return self._primary

    @property
    def log_file(self) -> Path:
        """The server log (connection errors, crashes), inside its directory."""
        return self._log_file

    # -- lifecycle

    def start(self) -> Self:
        """Initialise on first call, then start and wait until it accepts connections."""
        with self._lock:
            self._check_open()
            if not self._initialized:
                self._initialize()
                self._initialized = True
            if self.is_running():
                return self
            try:
                run(
                    [str(pg_bindir() / "pg_ctl"), "start", "-D", str(self.data_dir),
                     "-l", str(self._log_file), "-w", "-t", str(int(START_TIMEOUT)), "-s"],
                    cwd=self._root, what=f"pg_ctl start on port {self.port}",
                    timeout=START_TIMEOUT + 30,
                )
            except EmbeddedServerError as exc:
                raise EmbeddedServerError(
                    f"PostgreSQL on port {self.port} did not start ({exc}); "
                    f"server log tail:\n{tail(self._log_file)}"
                ) from None
            return self

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server if it runs; "immediate" simulates a crash (recovery on start)."""
        with self._lock:
            if not self._initialized or not self.is_running():
                return
            run(
                [str(pg_bindir() / "pg_ctl"), "stop", "-D", str(self.data_dir),
                 "-m", mode, "-w", "-t", "60", "-s"],
                cwd=self._root, what=f"pg_ctl stop -m {mode} on port {self.port}", timeout=90,
            )

    def restart(self) -> None:
        """Stop (fast) and start again on the same port and data directory."""
        with self._lock:
            self.stop()
            self.start()

    def is_running(self) -> bool:
        """Whether the postmaster of this data directory is alive."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        status = subprocess.run(
            [str(pg_bindir() / "pg_ctl"), "status", "-D", str(self.data_dir)],
            cwd=self._root, env=server_env(), capture_output=True, timeout=30, check=False,
            **as_service_user(),
        )
        return status.returncode == 0

    def _shutdown(self) -> None:
        """Close its replicas, then stop itself, escalating to SIGKILL."""
        for replica in self._replicas:
            replica.close()
        self._replicas.clear()
        self._force_stop()

    # -- connections

    def url(
        self, *, user: str = "postgres", password: str | None = None, dbname: str = "postgres"
    ) -> str:
        """postgresql:// URL for this server over TCP (password auth is real)."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    @property
    def superuser_url(self) -> str:
        """URL of the `postgres` superuser with its password."""
        return self.url(user="postgres", password=self.superuser_password)

    def current_wal_lsn(self) -> str:
        """pg_current_wal_lsn() of this (primary) server, as text."""
        with psycopg.connect(self.superuser_url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
        assert row is not None  # a scalar function always returns one row
        return str(row[0])

    # -- replicas

    def create_replica(self, *, port: int | None = None) -> PostgresServer:
        """A started hot-standby streaming replica (pg_basebackup -R -X stream) of this one."""
        with self._lock:
            self._check_open()
            if not self.is_running():
                raise EmbeddedServerError(
                    f"start the primary on port {self.port} before making a replica"
                )
            replica = PostgresServer(
                port=port, base_dir=self._base_dir, superuser_password=self.superuser_password
            )
            replica._primary = self
            try:
                replica.start()
            except BaseException:
                replica.close()
                raise
            self._replicas.append(replica)
            return replica

    # -- internals

    def _initialize(self) -> None:
        self._socket_dir.mkdir()
        hand_over(self._socket_dir)
        if self._primary is None:
            self._initdb()
        else:
            self._basebackup(self._primary)

    def _initdb(self) -> None:
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        hand_over(pwfile)
        try:
            run(
                [str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "--username=postgres",
                 f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                 "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
                cwd=self._root, what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        (self.data_dir / "pg_hba.conf").write_text(_pg_hba())
        self._append_conf(_primary_conf(self._extra_conf))

    def _basebackup(self, primary: PostgresServer) -> None:
        run(
            [str(pg_bindir() / "pg_basebackup"), "-h", primary.host, "-p", str(primary.port),
             "-U", "postgres", "-D", str(self.data_dir), "-R", "-X", "stream",
             "-c", "fast", "--no-sync", "-w"],
            cwd=self._root, what=f"pg_basebackup from port {primary.port}",
            env=server_env(PGPASSWORD=primary.superuser_password),
        )
        self._append_conf({"hot_standby": "on", "hot_standby_feedback": "on"})

    def _append_conf(self, settings: Mapping[str, str]) -> None:
        # Appended last, so these win over whatever the file (or the primary's copy) says.
        own = {"port": str(self.port), "unix_socket_directories": str(self._socket_dir)}
        lines = [f"{key} = {_conf_value(value)}" for key, value in {**settings, **own}.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# hcrepo.testing\n" + "\n".join(lines) + "\n")

    def _force_stop(self) -> None:
        if not self._initialized:
            return
        modes: tuple[Literal["fast", "immediate"], ...] = ("fast", "immediate")
        for mode in modes:
            with contextlib.suppress(EmbeddedServerError, subprocess.SubprocessError):
                self.stop(mode)
            with contextlib.suppress(subprocess.SubprocessError):
                if not self.is_running():
                    return
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)


def wait_for_replay(replica: PostgresServer, lsn: str, *, timeout: float = 30.0) -> None:
    """Return once `replica` has replayed WAL up to `lsn`; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    with psycopg.connect(replica.superuser_url, autocommit=True, connect_timeout=10) as conn:
        while True:
            row = conn.execute(
                "select pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
            ).fetchone()
            replayed = row[0] if row else None
            if replayed is None:
                raise EmbeddedServerError(f"server on port {replica.port} is not a replica")
            if replayed:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"replica on port {replica.port} did not replay {lsn} within {timeout}s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
