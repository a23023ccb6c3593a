"""Running server binaries: as which user, in which directory, to completion or as daemons,
and the exit hook that closes the servers nobody closed.

PostgreSQL refuses to run as root, and CI runs as root: then every server binary runs as
the unprivileged system user `hcrepo-pg`, created on first use, in directories it owns.
A normal user simply runs them as themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hcrepo.testing.errors import EmbeddedServerError

SERVICE_USER = "hcrepo-pg"
START_TIMEOUT = 60.0
_LOG_TAIL_LINES = 20


# --- the service account -----------------------------------------------------------------


@functools.cache
def service_account() -> tuple[int, int] | None:
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


def as_service_user() -> dict[str, Any]:
    """subprocess keyword arguments that drop root for server binaries."""
    account = service_account()
    if account is None:
        return {}
    uid, gid = account
    return {"user": uid, "group": gid, "extra_groups": []}


def hand_over(path: Path) -> None:
    """Give `path` to the service user (when there is one) so the servers can use it."""
    account = service_account()
    if account is not None:
        os.chown(path, *account)


def server_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its PG* variables, plus `extra`."""
    # PG* variables of the caller (PGHOST, PGPORT ...) must not steer a tool to another server.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra)
    return env


def private_dir(prefix: str, base_dir: Path | None) -> Path:
    """A new directory owned by whoever runs the servers, checked reachable by them."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    if service_account() is not None:
        hand_over(path)
        reachable = subprocess.run(
            ["test", "-w", str(path), "-a", "-x", str(path)],
            cwd="/", timeout=30, check=False, **as_service_user(),
        )
        if reachable.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            raise EmbeddedServerError(
                f"{path} is not reachable by user {SERVICE_USER}: "
                "use a base_dir below a world-traversable directory such as /tmp"
            )
    return path


# --- running tools and daemons -------------------------------------------------------------


def tail(path: Path) -> str:
    """The last lines of a server log, for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def run(args: Sequence[str], *, cwd: Path, what: str, timeout: float = 120.0,
        env: Mapping[str, str] | None = None) -> None:
    """Run a server tool as the service user; raise with its output on failure."""
    try:
        result = subprocess.run(
            list(args), cwd=cwd, env=dict(env) if env is not None else server_env(),
            capture_output=True, text=True, timeout=timeout, check=False,
            **as_service_user(),
        )
    except subprocess.TimeoutExpired:
        raise EmbeddedServerError(f"{what}: timed out after {timeout:.0f}s") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise EmbeddedServerError(f"{what} failed (exit {result.returncode}): {output}")


def spawn(args: Sequence[str], *, cwd: Path) -> subprocess.Popen[bytes]:
    """Start a server daemon in the foreground of its own process, as the service user."""
    # A session of its own: Ctrl-C of the test run must leave the server to close().
    return subprocess.Popen(
        list(args), cwd=cwd, env=server_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        **as_service_user(),
    )


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the server lingers."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


# --- cleanup at interpreter exit ---------------------------------------------------------


class Closable(Protocol):
    def close(self) -> None: ...


class _Leftovers:
    """Servers not closed yet. The exit hook is registered with the first of them, so that
    importing this package changes nothing about how the interpreter exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[Closable] = set()
        self._hooked = False

    def add(self, server: Closable) -> None:
        with self._lock:
            if not self._hooked:
                atexit.register(self.close_all)
                self._hooked = True
            self._live.add(server)

    def discard(self, server: Closable) -> None:
        with self._lock:
            self._live.discard(server)

    def close_all(self) -> None:
        """Servers nobody closed (a crashed demo, a forgotten one) go with the interpreter."""
        with self._lock:
            leftovers = list(self._live)
        for server in leftovers:
            with contextlib.suppress(Exception):
                server.close()


_leftovers = _Leftovers()
track = _leftovers.add
untrack = _leftovers.discard
