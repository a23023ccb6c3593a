"""Loopback ports for throw-away servers: free now, never one of the machine's default
servers' ports, never handed out twice by this process."""

from __future__ import annotations

import socket
import threading

from hcrepo.testing.errors import EmbeddedServerError

LOOPBACK = "127.0.0.1"

# The default instances of the machine, which throw-away servers must never take.
RESERVED_PORTS = frozenset({5432, 6379})
# Redis Cluster nodes also listen on port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10000

_lock = threading.Lock()
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_port(*, cluster_bus: bool) -> int:
    """A free loopback port; with `cluster_bus`, its cluster bus port is free too."""
    # Remembering handed-out ports stops two servers of this process from getting the same
    # one between free_port() and the moment the first of them binds it.
    with _lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port: int = sock.getsockname()[1]
            if port in RESERVED_PORTS or port in _handed_out:
                continue
            if cluster_bus:
                bus = port + CLUSTER_BUS_OFFSET
                if bus > 65535 or bus in RESERVED_PORTS or not _bindable(bus):
                    continue
            _handed_out.add(port)
            return port
    raise EmbeddedServerError("no free loopback port found")


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    return pick_port(cluster_bus=False)


def check_port(port: int | None) -> int:
    """`port`, refused when it is a default server's; a free one when None."""
    if port is None:
        return free_port()
    if port in RESERVED_PORTS:
        raise EmbeddedServerError(f"port {port} belongs to the machine's default servers")
    return port


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0
