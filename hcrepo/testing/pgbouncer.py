"""A throw-away PgBouncer in transaction pooling mode in front of one throw-away database."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self
from urllib.parse import quote

from hcrepo.testing.base import ThrowAwayServer
from hcrepo.testing.errors import EmbeddedServerError
from hcrepo.testing.ports import accepts
from hcrepo.testing.postgres import PostgresServer
from hcrepo.testing.processes import START_TIMEOUT, hand_over, spawn, tail, terminate


class PgBouncer(ThrowAwayServer):
    """A throw-away PgBouncer in transaction pooling mode in front of one database.

    `pool_size` server connections are shared by every client, so two clients' transactions
    land on the same server session one after the other: what tenant isolation must survive.
    Client and server logins use `users` (name -> password), scram on both sides.
    """

    _what = "PgBouncer"

    def __init__(
        self,
        server: PostgresServer,
        *,
        dbname: str,
        users: Mapping[str, str],
        pool_size: int = 1,
        base_dir: Path | None = None,
    ) -> None:
        super().__init__(prefix="hcrepo-pgbouncer-", port=None, base_dir=base_dir)
        self._server = server
        self._dbname = dbname
        self._users = dict(users)
        self._pool_size = pool_size
        self._log_file = self._root / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, *, user: str) -> str:
        return (f"postgresql://{quote(user, safe='')}:{quote(self._users[user], safe='')}"
                f"@{self.host}:{self.port}/{quote(self._dbname, safe='')}")

    def start(self) -> Self:
        with self._lock:
            if self.is_running():
                return self
            binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
            config = self._write_config()
            self._process = spawn([binary, str(config)], cwd=self._root)
            self._wait_ready()
            return self

    def is_running(self) -> bool:
        """Whether the pgbouncer process started here is alive."""
        return self._process is not None and self._process.poll() is None

    def _shutdown(self) -> None:
        if self._process is not None and self._process.poll() is None:
            terminate(self._process)

    def _write_config(self) -> Path:
        """pgbouncer.ini and its userlist, readable by the service user only."""
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
        for path in (config, userlist):
            path.chmod(0o600)
            hand_over(path)
        return config

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() >= deadline:
                log = tail(self._log_file)
                self.close()
                raise EmbeddedServerError(
                    f"pgbouncer on port {self.port} did not start; log tail:\n{log}"
                )
            time.sleep(0.01)
