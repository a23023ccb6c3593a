"""A throw-away redis-server (no persistence) and a three-master Redis Cluster of them."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hcrepo.testing.base import ThrowAway, ThrowAwayServer
from hcrepo.testing.binaries import redis_binary
from hcrepo.testing.errors import EmbeddedServerError
from hcrepo.testing.ports import LOOPBACK, pick_port
from hcrepo.testing.processes import START_TIMEOUT, server_env, spawn, tail, terminate


class RedisServer(ThrowAwayServer):
    """A throw-away redis-server on 127.0.0.1:<port>, no persistence, own temp dir.

    Used as a context manager it is started on entry and closed on exit.
    """

    url: str
    _what = "Redis server"

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
        super().__init__(prefix="hcrepo-redis-", port=port, base_dir=base_dir)
        self.url = f"redis://{self.host}:{self.port}/0"
        self._extra_args = tuple(extra_args)
        self._log_file = self._root / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server (the caller closes it)."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def start(self) -> Self:
        """Start redis-server and wait until it answers PING; no-op when running."""
        with self._lock:
            self._check_open()
            if self.is_running():
                return self
            self._process = spawn(
                [redis_binary("redis-server"), "--port", str(self.port), "--bind", self.host,
                 "--save", "", "--appendonly", "no", "--dir", str(self._root),
                 "--logfile", str(self._log_file), "--daemonize", "no", *self._extra_args],
                cwd=self._root,
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
            terminate(process)

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

    def _shutdown(self) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        # No client-side retries: this loop is the retry, and it must see the exit promptly.
        no_retry = Retry(NoBackoff(), 0)
        with self.client(socket_connect_timeout=1, socket_timeout=1, retry=no_retry) as conn:
            while True:
                if self._process.poll() is not None:
                    raise EmbeddedServerError(
                        f"redis-server on port {self.port} exited with "
                        f"{self._process.returncode}; log tail:\n{tail(self._log_file)}"
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
                        f"{START_TIMEOUT:.0f}s; log tail:\n{tail(self._log_file)}"
                    )
                time.sleep(0.01)


class RedisCluster(ThrowAway):
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
                port=pick_port(cluster_bus=True), base_dir=base_dir, extra_args=cluster_args
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
        args = [redis_binary("redis-cli"), "--cluster", "create",
                *(f"{host}:{port}" for host, port in self.startup_nodes),
                "--cluster-replicas", "0", "--cluster-yes"]
        try:
            result = subprocess.run(
                args, env=server_env(), capture_output=True, text=True, timeout=120,
                check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedServerError("redis-cli --cluster create timed out") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            raise EmbeddedServerError(f"redis-cli --cluster create failed: {output}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
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
                    f"{START_TIMEOUT:.0f}s (cluster_state={fields.get('cluster_state')})"
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
