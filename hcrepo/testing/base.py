"""What every throw-away server shares: the context-manager lifecycle, and for a server of
its own a loopback port, a private directory, a lock and closing exactly once."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from hcrepo.testing.errors import EmbeddedServerError
from hcrepo.testing.ports import LOOPBACK, check_port
from hcrepo.testing.processes import private_dir, track, untrack


class ThrowAway:
    """`with Server() as s` starts it (closing whatever a failed start left behind) and
    closes it on the way out."""

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


class ThrowAwayServer(ThrowAway):
    """One server on 127.0.0.1:<port> in its own temporary directory.

    From creation on it is tracked, so that one nobody closed is closed at interpreter exit;
    `close()` stops it (`_shutdown`), deletes the directory and stops tracking it, once.
    """

    host: str
    port: int
    # Names the server in "is closed" errors.
    _what: ClassVar[str]

    def __init__(self, *, prefix: str, port: int | None, base_dir: Path | None) -> None:
        """Reserve the port (free one when None), then the directory (`prefix*` in base_dir,
        default /tmp): a refused port leaves no directory behind."""
        self.host = LOOPBACK
        self.port = check_port(port)
        self._root = private_dir(prefix, base_dir)
        self._lock = threading.RLock()
        self._closed = False
        track(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} {self._state()}>"

    def is_running(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server and delete its directory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._shutdown()
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
                untrack(self)

    def _shutdown(self) -> None:
        """Stop whatever runs; `close()` deletes the directory afterwards."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise EmbeddedServerError(f"{self._what} on port {self.port} is closed")

    def _state(self) -> str:
        return "closed" if self._closed else ("running" if self.is_running() else "stopped")
