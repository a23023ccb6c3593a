"""A loopback TCP relay between client and PostgreSQL that counts network round trips.

Each chunk is recorded before it is forwarded, so the log is causally ordered: a reply is
always logged after the request it answers, and a request that waited for a reply is logged
after that reply. A round trip is then a maximal run of client chunks; a client that waits
for an answer before sending more shows up as two runs.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_CHUNK = 65536


class Relay:
    def __init__(self, target_url: str) -> None:
        params = conninfo_to_dict(target_url)
        self._target = (str(params["host"]), int(str(params["port"])))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(target_url, host="127.0.0.1", port=self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._log: list[tuple[str, int]] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self._log.clear()

    @property
    def bytes_sent(self) -> int:
        """Bytes from clients to the server since the last reset."""
        with self._lock:
            return sum(size for direction, size in self._log if direction == "c")

    @property
    def round_trips(self) -> int:
        """Runs of client chunks since the last reset."""
        with self._lock:
            directions = [direction for direction, _ in self._log]
        return sum(
            1 for i, d in enumerate(directions) if d == "c" and (i == 0 or directions[i - 1] != "c")
        )

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            # close() alone does not wake a pump blocked in recv(), which keeps the socket
            # open: the client would wait forever for a reply (a pool worker mid-connect
            # then cannot be stopped) and the server backend would never see its end.
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            for source, sink, direction in ((client, server, "c"), (server, client, "s")):
                threading.Thread(
                    target=self._pump, args=(source, sink, direction), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while chunk := source.recv(_CHUNK):
                with self._lock:
                    self._log.append((direction, len(chunk)))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def relay(target_url: str) -> Iterator[Relay]:
    r = Relay(target_url)
    try:
        yield r
    finally:
        r.close()
