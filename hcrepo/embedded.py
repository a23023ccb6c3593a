"""Throw-away PostgreSQL and Redis servers started from the binaries on this machine.

The test suite and `hcrepo demo` both need a primary, streaming replicas, Redis and a
Redis Cluster that nobody else uses. Each server lives on a free loopback port in its own
temporary directory and is gone (processes and files) after `close()`. Ports 5432 and
6379 are refused so a default instance on the machine is never touched.

PostgreSQL refuses to run as root, and CI runs as root: then every server binary runs as
the unprivileged system user `hcrepo-pg`, created on first use, in directories it owns.
A normal user simply runs them as themselves.

The clusters trade durability for speed (fsync, full_page_writes off): they hold nothing
worth keeping. `synchronous_commit` stays on, though: with it off, `pg_current_wal_lsn()`
right after COMMIT can lag the commit record, and every "wait until the replica has
replayed my write" check would race.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self
from urllib.parse import quote

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hcrepo.errors import HcrepoError

SERVICE_USER = "hcrepo-pg"
MIN_PG_MAJOR = 14
PG_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
LOOPBACK = "127.0.0.1"

# The default instances of the machine, which throw-away servers must never take.
_RESERVED_PORTS = frozenset({5432, 6379})
# Redis Cluster nodes also listen on port + 10000 (the cluster bus).
_CLUSTER_BUS_OFFSET = 10000
_START_TIMEOUT = 60.0
_LOG_TAIL_LINES = 20


class EmbeddedServerError(HcrepoError):
    """A throw-away server could not be found, started, reached or stopped."""


# --- binaries ---------------------------------------------------------------------------


def _pg_major(bindir: Path) -> int | None:
    """Major version of the `postgres` binary in `bindir`, or None when unusable."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(found.group(1)) if found else None


def _bindir_candidates() -> Iterator[Path]:
    on_path = shutil.which("initdb")
    if on_path:
        # A PATH entry may hold only symlinks to some of the binaries (/usr/local/bin here).
        yield Path(on_path).parent
        yield Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            if out:
                yield Path(out)

    def version_key(path: Path) -> tuple[int, str]:
        major = path.parent.name
        return (int(major) if major.isdigit() else -1, major)

    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)


@functools.cache
def pg_bindir() -> Path:
    """Directory holding initdb, pg_ctl, pg_basebackup and postgres of version >= 14.

    Looked for on PATH, then at `pg_config --bindir`, then in the highest
    /usr/lib/postgresql/*/bin.
    """
    seen: set[Path] = set()
    for candidate in _bindir_candidates():
        if candidate in seen:
            continue
        seen.add(candidate)
        if not all(os.access(candidate / name, os.X_OK) for name in PG_BINARIES):
            continue
        major = _pg_major(candidate)
        if major is not None and major >= MIN_PG_MAJOR:
            return candidate
    raise EmbeddedServerError(
        f"no PostgreSQL >= {MIN_PG_MAJOR} server binaries ({', '.join(PG_BINARIES)}) on PATH, "
        "at pg_config --bindir or in /usr/lib/postgresql/*/bin: "
        "install postgresql (scripts/ensure-system-deps.sh does it)"
    )


def _redis_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EmbeddedServerError(f"{name} not found on PATH: install redis-server")
    return path


# --- ports ------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _pick_port(*, cluster_bus: bool) -> int:
    # Remembering handed-out ports stops two servers of this process from getting the same
    # one between free_port() and the moment the first of them binds it.
    with _ports_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port: int = sock.getsockname()[1]
            if port in _RESERVED_PORTS or port in _ports_handed_out:
                continue
            if cluster_bus:
                bus = port + _CLUSTER_BUS_OFFSET
                if bus > 65535 or bus in _RESERVED_PORTS or not _bindable(bus):
                    continue
            _ports_handed_out.add(port)
            return port
    raise EmbeddedServerError("no free loopback port found")


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    return _pick_port(cluster_bus=False)


def _check_port(port: int | None) -> int:
    if port is None:
        return free_port()
    if port in _RESERVED_PORTS:
        raise EmbeddedServerError(f"port {port} belongs to the machine's default servers")
    return port


# --- running as the service user --------------------------------------------------------


@functools.cache
def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run servers as, creating the user when root; None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        created = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            capture_output=True, text=True, timeout=60,
        )
        try:
            # Another process may have created it first: only its existence matters.
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise EmbeddedServerError(
                f"cannot create system user {SERVICE_USER} to run servers as: "
                f"{created.stderr.strip() or created.returncode}"
            ) from None
    return entry.pw_uid, entry.pw_gid


def _as_service_user() -> dict[str, Any]:
    """subprocess keyword arguments that drop root for server binaries."""
    account = _service_account()
    if account is None:
        return {}
    uid, gid = account
    return {"user": uid, "group": gid, "extra_groups": []}


def _server_env(**extra: str) -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGPORT ...) must not steer a tool to another server.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra)
    return env


def _private_dir(prefix: str, base_dir: Path | None) -> Path:
    """A new directory owned by whoever runs the servers, checked reachable by them."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    account = _service_account()
    if account is not None:
        os.chown(path, *account)
        reachable = subprocess.run(
            ["test", "-w", str(path), "-a", "-x", str(path)],
            cwd="/", timeout=30, check=False, **_as_service_user(),
        )
        if reachable.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            raise EmbeddedServerError(
                f"{path} is not reachable by user {SERVICE_USER}: "
                "use a base_dir below a world-traversable directory such as /tmp"
            )
    return path


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def _run(args: Sequence[str], *, cwd: Path, what: str, timeout: float = 120.0,
         env: Mapping[str, str] | None = None) -> None:
    """Run a server tool as the service user; raise with its output on failure."""
    try:
        result = subprocess.run(
            list(args), cwd=cwd, env=dict(env) if env is not None else _server_env(),
            capture_output=True, text=True, timeout=timeout, check=False,
            **_as_service_user(),
        )
    except subprocess.TimeoutExpired:
        raise EmbeddedServerError(f"{what}: timed out after {timeout:.0f}s") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise EmbeddedServerError(f"{what} failed (exit {result.returncode}): {output}")


# --- cleanup at interpreter exit --------------------------------------------------------


class _Closable(Protocol):
    def close(self) -> None: ...


_live_lock = threading.Lock()
_live: set[_Closable] = set()


def _track(server: _Closable) -> None:
    with _live_lock:
        _live.add(server)


def _untrack(server: _Closable) -> None:
    with _live_lock:
        _live.discard(server)


@atexit.register
def _close_leftovers() -> None:
    """Servers nobody closed (a crashed demo, a forgotten one) go with the interpreter."""
    with _live_lock:
        leftovers = list(_live)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.close()


# --- PostgreSQL -------------------------------------------------------------------------


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


class _ThrowAway:
    """What every throw-away server shares: `with Server() as s` starts it (closing whatever
    a failed start left behind) and closes it on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()


class PostgresServer(_ThrowAway):
    """A throw-away PostgreSQL cluster on 127.0.0.1:<port> in a temp dir.

    `start()` runs initdb the first time (or pg_basebackup for a replica made by
    `create_replica`), then `pg_ctl start`; `close()` stops it and deletes its directory,
    together with the replicas made from it. Used as a context manager it is started on
    entry and closed on exit. Methods are safe to call from several threads.
    """

    host: str
    port: int
    data_dir: Path
    superuser_password: str

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        superuser_password: str = "hcrepo-test",
        extra_conf: Mapping[str, str] | None = None,
    ) -> None:
        """Reserve a port and a directory (`hcrepo-pg-*` inside base_dir, default /tmp)."""
        self.host = LOOPBACK
        self.port = _check_port(port)
        self.superuser_password = superuser_password
        self._base_dir = base_dir
        self._extra_conf = dict(extra_conf or {})
        self._root = _private_dir("hcrepo-pg-", base_dir)
        self.data_dir = self._root / "data"
        self._socket_dir = self._root / "sock"
        self._log_file = self._root / "postgres.log"
        self._primary: PostgresServer | None = None
        self._replicas: list[PostgresServer] = []
        self._lock = threading.RLock()
        self._initialized = False
        self._closed = False
        _track(self)

    def __repr__(self) -> str:
        role = "replica" if self._primary is not None else "primary"
        state = "closed" if self._closed else ("running" if self.is_running() else "stopped")
        return f"<{type(self).__name__} {role} {self.host}:{self.port} {state}>"

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
                _run(
                    [str(pg_bindir() / "pg_ctl"), "start", "-D", str(self.data_dir),
                     "-l", str(self._log_file), "-w", "-t", str(int(_START_TIMEOUT)), "-s"],
                    cwd=self._root, what=f"pg_ctl start on port {self.port}",
                    timeout=_START_TIMEOUT + 30,
                )
            except EmbeddedServerError as exc:
                raise EmbeddedServerError(
                    f"PostgreSQL on port {self.port} did not start ({exc}); "
                    f"server log tail:\n{_tail(self._log_file)}"
                ) from None
            return self

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server if it runs; "immediate" simulates a crash (recovery on start)."""
        with self._lock:
            if not self._initialized or not self.is_running():
                return
            _run(
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
            cwd=self._root, env=_server_env(), capture_output=True, timeout=30, check=False,
            **_as_service_user(),
        )
        return status.returncode == 0

    def close(self) -> None:
        """Stop its replicas and itself (escalating to SIGKILL) and delete the directories."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for replica in self._replicas:
                    replica.close()
                self._replicas.clear()
                self._force_stop()
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
                _untrack(self)

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

    def _check_open(self) -> None:
        if self._closed:
            raise EmbeddedServerError(f"PostgreSQL server on port {self.port} is closed")

    def _initialize(self) -> None:
        self._socket_dir.mkdir()
        account = _service_account()
        if account is not None:
            os.chown(self._socket_dir, *account)
        if self._primary is None:
            self._initdb()
        else:
            self._basebackup(self._primary)

    def _initdb(self) -> None:
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        account = _service_account()
        if account is not None:
            os.chown(pwfile, *account)
        try:
            _run(
                [str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "--username=postgres",
                 f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                 "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
                cwd=self._root, what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        (self.data_dir / "pg_hba.conf").write_text(_pg_hba())
        self._append_conf({
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
            **self._extra_conf,
        })

    def _basebackup(self, primary: PostgresServer) -> None:
        _run(
            [str(pg_bindir() / "pg_basebackup"), "-h", primary.host, "-p", str(primary.port),
             "-U", "postgres", "-D", str(self.data_dir), "-R", "-X", "stream",
             "-c", "fast", "--no-sync", "-w"],
            cwd=self._root, what=f"pg_basebackup from port {primary.port}",
            env=_server_env(PGPASSWORD=primary.superuser_password),
        )
        self._append_conf({"hot_standby": "on", "hot_standby_feedback": "on"})

    def _append_conf(self, settings: Mapping[str, str]) -> None:
        # Appended last, so these win over whatever the file (or the primary's copy) says.
        own = {"port": str(self.port), "unix_socket_directories": str(self._socket_dir)}
        lines = [f"{key} = {_conf_value(value)}" for key, value in {**settings, **own}.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# hcrepo.embedded\n" + "\n".join(lines) + "\n")

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


# --- Redis ------------------------------------------------------------------------------


class RedisServer(_ThrowAway):
    """A throw-away redis-server on 127.0.0.1:<port>, no persistence, own temp dir.

    Used as a context manager it is started on entry and closed on exit.
    """

    host: str
    port: int
    url: str

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Reserve a port and a directory (`hcrepo-redis-*` inside base_dir, default /tmp).

        `extra_args` are appended to the redis-server command line (e.g. "--requirepass", "x").
        """
        self.host = LOOPBACK
        self.port = _check_port(port)
        self.url = f"redis://{self.host}:{self.port}/0"
        self._extra_args = tuple(extra_args)
        self._root = _private_dir("hcrepo-redis-", base_dir)
        self._log_file = self._root / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._closed = False
        _track(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.is_running() else "stopped")
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server (the caller closes it)."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def start(self) -> Self:
        """Start redis-server and wait until it answers PING; no-op when running."""
        with self._lock:
            if self._closed:
                raise EmbeddedServerError(f"Redis server on port {self.port} is closed")
            if self.is_running():
                return self
            args = [
                _redis_binary("redis-server"), "--port", str(self.port), "--bind", self.host,
                "--save", "", "--appendonly", "no", "--dir", str(self._root),
                "--logfile", str(self._log_file), "--daemonize", "no", *self._extra_args,
            ]
            # A session of its own: Ctrl-C of the test run must leave the server to close().
            self._process = subprocess.Popen(
                args, cwd=self._root, env=_server_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                **_as_service_user(),
            )
            self._wait_ready()
            return self

    def is_running(self) -> bool:
        """Whether the redis-server process started here is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Terminate the server (it saves nothing on SIGTERM), SIGKILL if it lingers."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            # SIGTERM rather than SHUTDOWN NOSAVE: it needs no password and no client retries.
            _terminate(process)

    def kill(self) -> None:
        """SIGKILL the server (a crash, for failure tests); `restart()` brings it back."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
                self._process.wait(timeout=30)

    def restart(self) -> None:
        """Stop if running, then start again on the same port (empty: nothing is saved)."""
        with self._lock:
            self.stop()
            self.start()

    def close(self) -> None:
        """Stop the server and delete its directory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.stop()
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
                _untrack(self)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        # No client-side retries: this loop is the retry, and it must see the exit promptly.
        no_retry = Retry(NoBackoff(), 0)
        with self.client(socket_connect_timeout=1, socket_timeout=1, retry=no_retry) as conn:
            while True:
                if self._process.poll() is not None:
                    raise EmbeddedServerError(
                        f"redis-server on port {self.port} exited with "
                        f"{self._process.returncode}; log tail:\n{_tail(self._log_file)}"
                    )
                try:
                    conn.ping()
                    return
                except redis.AuthenticationError:
                    return  # it answers; only this client lacks the password
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() >= deadline:
                    self.kill()
                    raise EmbeddedServerError(
                        f"redis-server on port {self.port} did not answer within "
                        f"{_START_TIMEOUT:.0f}s; log tail:\n{_tail(self._log_file)}"
                    )
                time.sleep(0.01)


class RedisCluster(_ThrowAway):
    """A throw-away Redis Cluster of three masters (no replicas) on loopback ports."""

    ports: list[int]
    startup_nodes: list[tuple[str, int]]
    url: str

    _MASTERS = 3

    def __init__(self, *, base_dir: Path | None = None) -> None:
        """Reserve the nodes' ports (each with its bus port free) and directories."""
        cluster_args = (
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000",
        )
        self.nodes = [
            RedisServer(
                port=_pick_port(cluster_bus=True), base_dir=base_dir, extra_args=cluster_args
            )
            for _ in range(self._MASTERS)
        ]
        self.ports = [node.port for node in self.nodes]
        self.startup_nodes = [(LOOPBACK, port) for port in self.ports]
        self.url = f"redis://{LOOPBACK}:{self.ports[0]}"
        self._lock = threading.RLock()
        self._created = False

    def start(self) -> Self:
        """Start the nodes, assign the slots, wait until every node says cluster_state:ok."""
        with self._lock:
            for node in self.nodes:
                node.start()
            if not self._created:
                self._create()
                self._created = True
            self._wait_ok()
            return self

    def close(self) -> None:
        """Stop every node and delete their directories; idempotent."""
        with self._lock:
            for node in self.nodes:
                node.close()

    def _create(self) -> None:
        args = [_redis_binary("redis-cli"), "--cluster", "create",
                *(f"{host}:{port}" for host, port in self.startup_nodes),
                "--cluster-replicas", "0", "--cluster-yes"]
        try:
            result = subprocess.run(
                args, env=_server_env(), capture_output=True, text=True, timeout=120,
                check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedServerError("redis-cli --cluster create timed out") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            raise EmbeddedServerError(f"redis-cli --cluster create failed: {output}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        pending = list(self.nodes)
        while pending:
            node = pending[0]
            with node.client(socket_timeout=5) as conn:
                info = conn.cluster("INFO")
            fields = dict(_cluster_info_fields(info))
            if (fields.get("cluster_state") == "ok"
                    and fields.get("cluster_known_nodes") == str(self._MASTERS)):
                pending.pop(0)
                continue
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"Redis Cluster node on port {node.port} not ok within "
                    f"{_START_TIMEOUT:.0f}s (cluster_state={fields.get('cluster_state')})"
                )
            time.sleep(0.05)


def _cluster_info_fields(info: object) -> Iterator[tuple[str, str]]:
    """key/value pairs of a CLUSTER INFO reply, whichever shape redis-py returns."""
    if isinstance(info, dict):
        for key, value in info.items():
            yield str(key), str(value)
        return
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


class PgBouncer(_ThrowAway):
    """A throw-away PgBouncer in transaction pooling mode in front of one database.

    `pool_size` server connections are shared by every client, so two clients' transactions
    land on the same server session one after the other: what invariant 2 must survive.
    Client and server logins use `users` (name -> password), scram on both sides.
    """

    host: str
    port: int

    def __init__(
        self,
        server: PostgresServer,
        *,
        dbname: str,
        users: Mapping[str, str],
        pool_size: int = 1,
        base_dir: Path | None = None,
    ) -> None:
        self.host = LOOPBACK
        self.port = _check_port(None)
        self._server = server
        self._dbname = dbname
        self._users = dict(users)
        self._pool_size = pool_size
        self._root = _private_dir("hcrepo-pgbouncer-", base_dir)
        self._log_file = self._root / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._closed = False
        _track(self)

    def url(self, *, user: str) -> str:
        return (f"postgresql://{quote(user, safe='')}:{quote(self._users[user], safe='')}"
                f"@{self.host}:{self.port}/{quote(self._dbname, safe='')}")

    def start(self) -> Self:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return self
            binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
            config = self._root / "pgbouncer.ini"
            userlist = self._root / "userlist.txt"
            userlist.write_text("".join(
                f'"{name}" "{password}"\n' for name, password in self._users.items()
            ))
            config.write_text(
                "[databases]\n"
                f"{self._dbname} = host={self._server.host} port={self._server.port} "
                f"dbname={self._dbname}\n"
                "[pgbouncer]\n"
                f"listen_addr = {self.host}\nlisten_port = {self.port}\n"
                "unix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
                "pool_mode = transaction\n"
                f"default_pool_size = {self._pool_size}\nmin_pool_size = 0\n"
                f"logfile = {self._log_file}\npidfile = {self._root / 'pgbouncer.pid'}\n"
                "ignore_startup_parameters = extra_float_digits,options\n"
            )
            account = _service_account()
            for path in (config, userlist):
                path.chmod(0o600)
                if account is not None:
                    os.chown(path, *account)
            self._process = subprocess.Popen(
                [binary, str(config)], cwd=self._root, env=_server_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, **_as_service_user(),
            )
            self._wait_ready()
            return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._process is not None and self._process.poll() is None:
                    _terminate(self._process)
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
                _untrack(self)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while not _accepts(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() >= deadline:
                log = _tail(self._log_file)
                self.close()
                raise EmbeddedServerError(
                    f"pgbouncer on port {self.port} did not start; log tail:\n{log}"
                )
            time.sleep(0.01)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the server lingers."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0
