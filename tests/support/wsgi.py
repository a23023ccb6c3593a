"""A WSGI application served by a real waitress in a thread, stopped cleanly afterwards."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import waitress.server

WAIT = 10.0


@contextlib.contextmanager
def served(app: Any, threads: int) -> Iterator[int]:
    """`app` on waitress with `threads` worker threads; yields the port. With one thread,
    every request is served by the same worker thread, one after the other."""
    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=threads)
    stop = threading.Event()

    def serve() -> None:
        # Short polls, so the loop notices `stop` and the listening socket is closed only
        # after it has left select() (closing it under select() fails in the thread).
        while not stop.is_set():
            server.asyncore.loop(timeout=0.05, map=server._map, count=1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.effective_port
    finally:
        stop.set()
        thread.join(WAIT)
        server.close()
        server.task_dispatcher.shutdown()
