"""The throw-away servers behave like the real deployment they stand in for."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from hcrepo.testing import (
    MIN_PG_MAJOR,
    PG_BINARIES,
    SERVICE_USER,
    EmbeddedServerError,
    PostgresServer,
    RedisCluster,
    RedisServer,
    pg_bindir,
    wait_for_replay,
)
from tests.plugins.servers import RedisFactory, WaitReplayed

DEFAULT_PORTS = {5432, 6379}
ROOT = Path(__file__).resolve().parents[1]


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def _scalar(url: str, sql: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_pg_bindir_holds_server_binaries_of_a_supported_version() -> None:
    bindir = pg_bindir()
    assert all(os.access(bindir / name, os.X_OK) for name in PG_BINARIES)
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    assert found is not None and int(found.group(1)) >= MIN_PG_MAJOR


def test_replica_serves_a_row_once_it_has_replayed_the_write(
    pg_primary: PostgresServer, pg_replica: PostgresServer, wait_replayed: WaitReplayed
) -> None:
    table = f"replayed_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_primary.superuser_url, autocommit=True) as conn:
        conn.execute(f"create table {table} (note text)")
        conn.execute(f"insert into {table} values ('written on the primary')")
    wait_replayed(pg_replica)
    assert _scalar(pg_replica.superuser_url, f"select note from {table}") == (
        "written on the primary"
    )


def test_every_replica_is_a_hot_standby_and_refuses_writes(
    pg_primary: PostgresServer, pg_replicas: list[PostgresServer]
) -> None:
    assert len(pg_replicas) == 2
    assert _scalar(pg_primary.superuser_url, "select pg_is_in_recovery()") is False
    for replica in pg_replicas:
        assert replica.primary is pg_primary
        assert _scalar(replica.superuser_url, "select pg_is_in_recovery()") is True
        with (
            psycopg.connect(replica.superuser_url, autocommit=True) as conn,
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
        ):
            conn.execute("create table nope (x int)")


def test_wait_for_replay_times_out_naming_the_replica_port(pg_replica: PostgresServer) -> None:
    with pytest.raises(TimeoutError, match=rf"port {pg_replica.port}\b"):
        wait_for_replay(pg_replica, "FFFFFFFF/0", timeout=0.2)


def test_wait_for_replay_refuses_a_primary(pg_primary: PostgresServer) -> None:
    with pytest.raises(EmbeddedServerError, match="not a replica"):
        wait_for_replay(pg_primary, pg_primary.current_wal_lsn(), timeout=1)


def test_password_authentication_is_real(pg_primary: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_primary.url(password="not-the-password"), connect_timeout=5)
    assert _scalar(pg_primary.superuser_url, "select current_user") == "postgres"


def test_primary_is_configured_for_replication_and_statement_stats(
    pg_primary: PostgresServer,
) -> None:
    url = pg_primary.superuser_url
    assert _scalar(url, "show listen_addresses") == "127.0.0.1"
    assert _scalar(url, "show wal_level") == "replica"
    assert _scalar(url, "show max_connections") == "200"
    assert _scalar(url, "show server_encoding") == "UTF8"
    sockets = Path(str(_scalar(url, "show unix_socket_directories")))
    assert sockets.parent == pg_primary.data_dir.parent
    assert "pg_stat_statements" in str(_scalar(url, "show shared_preload_libraries"))
    with psycopg.connect(url) as conn:  # a transaction, rolled back: the session DB stays clean
        conn.execute("create extension pg_stat_statements")
        conn.execute("create extension btree_gist")
        conn.execute("select count(*) from pg_stat_statements").fetchone()
        conn.rollback()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges")
def test_servers_run_as_the_unprivileged_service_user(
    pg_primary: PostgresServer, redis_server: RedisServer
) -> None:
    postmaster = int((pg_primary.data_dir / "postmaster.pid").read_text().split()[0])
    redis_pid = redis_server.client().info("server")["process_id"]
    for pid in (postmaster, redis_pid):
        uid = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
        assert int(uid) == int(subprocess.check_output(["id", "-u", SERVICE_USER]))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges")
def test_a_base_dir_the_service_user_cannot_reach_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    with pytest.raises(EmbeddedServerError, match="not reachable by user"):
        PostgresServer(base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_server_lifecycle_restart_crash_recovery_and_close() -> None:
    server = PostgresServer(base_dir=Path("/tmp"), extra_conf={"application_name": "lifecycle"})
    root = server.data_dir.parent
    try:
        assert not server.is_running()
        assert server.start() is server and server.start() is server  # idempotent
        assert _scalar(server.superuser_url, "show application_name") == "lifecycle"
        with psycopg.connect(server.superuser_url, autocommit=True) as conn:
            conn.execute("create table kept (x int)")
            conn.execute("insert into kept values (7)")
        server.restart()
        assert _scalar(server.superuser_url, "select x from kept") == 7
        server.stop("immediate")
        assert not server.is_running()
        server.start()  # crash recovery
        assert _scalar(server.superuser_url, "select x from kept") == 7
    finally:
        server.close()
    server.close()  # idempotent
    assert not root.exists()
    with pytest.raises(EmbeddedServerError, match="closed"):
        server.start()


def test_a_failed_start_reports_the_server_log_and_cleans_up() -> None:
    server = PostgresServer(extra_conf={"max_connections": "lots"})
    with pytest.raises(EmbeddedServerError, match="did not start") as failure:
        server.__enter__()
    assert "max_connections" in str(failure.value)  # from the server log tail
    assert not server.data_dir.parent.exists()


def test_closing_a_primary_closes_its_replicas() -> None:
    with PostgresServer() as primary:
        replica = primary.create_replica()
        assert replica.is_running()
    assert not replica.is_running()
    assert not replica.data_dir.parent.exists()


def test_default_ports_are_refused() -> None:
    for port in DEFAULT_PORTS:
        with pytest.raises(EmbeddedServerError, match=str(port)):
            PostgresServer(port=port)
        with pytest.raises(EmbeddedServerError, match=str(port)):
            RedisServer(port=port)


def test_servers_never_listen_on_the_default_ports(
    pg_primary: PostgresServer, pg_replicas: list[PostgresServer], redis_server: RedisServer
) -> None:
    for server in (pg_primary, *pg_replicas):
        assert int(str(_scalar(server.superuser_url, "show port"))) == server.port
        assert server.port not in DEFAULT_PORTS
    with redis_server.client() as client:
        assert client.config_get("port") == {"port": str(redis_server.port)}
    assert redis_server.port not in DEFAULT_PORTS


def test_redis_set_get_without_persistence(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("embedded:greeting", "hello", ex=60)
        assert client.get("embedded:greeting") == b"hello"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}


def test_redis_kill_and_restart_on_the_same_port(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    port = server.port
    with redis.Redis.from_url(server.url, socket_timeout=2) as client:
        client.set("k", "v")
        server.kill()
        assert not server.is_running()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        server.restart()
        assert server.port == port
        assert client.get("k") is None  # nothing was saved
        client.set("k", "again")
        assert client.get("k") == b"again"


def test_redis_factory_passes_server_arguments(redis_factory: RedisFactory) -> None:
    server = redis_factory("--requirepass", "s3cret")
    no_retry = Retry(NoBackoff(), 0)
    with (
        redis.Redis.from_url(server.url, retry=no_retry) as client,
        pytest.raises(redis.AuthenticationError),
    ):
        client.ping()
    with redis.Redis.from_url(server.url, password="s3cret") as client:
        assert client.ping()


@pytest.mark.cluster
def test_redis_cluster_is_ok_and_spreads_keys_over_its_nodes(
    redis_cluster: RedisCluster,
) -> None:
    assert len(redis_cluster.ports) == 3
    assert not set(redis_cluster.ports) & DEFAULT_PORTS
    for host, port in redis_cluster.startup_nodes:
        with redis.Redis(host=host, port=port) as node:
            assert node.cluster("INFO")["cluster_state"] == "ok"
    with redis.cluster.RedisCluster.from_url(redis_cluster.url) as client:
        keys_by_port: dict[int, str] = {}
        for i in range(200):
            key = f"embedded:{i}"
            port = client.get_node_from_key(key).port
            keys_by_port.setdefault(int(port), key)
            if len(keys_by_port) == 3:
                break
        assert set(keys_by_port) == set(redis_cluster.ports)
        for port, key in keys_by_port.items():
            client.set(key, str(port))
        for port, key in keys_by_port.items():
            assert client.get(key) == str(port).encode()


def test_without_the_testing_extra_the_package_names_the_install_command() -> None:
    result = _python(
        "import sys\n"
        "sys.modules['pytest_postgresql'] = None  # the testing extra is not installed\n"
        "try:\n"
        "    import hcrepo.testing\n"
        "except ImportError as exc:\n"
        "    print(exc.name, exc, sep='\\n')\n"
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "hcrepo.testing\n"
        "hcrepo.testing needs the testing extra: pip install 'hcrepo[testing]'\n"
    )


def test_the_exit_hook_is_registered_by_the_first_server_not_by_the_import() -> None:
    result = _python(
        "import atexit\n"
        # What the package imports anyway, so that only its own registrations are counted.
        "import psycopg, pytest_postgresql, redis, redis.backoff, redis.retry, hcrepo\n"
        "before = atexit._ncallbacks()\n"
        "import hcrepo.testing\n"
        "imported = atexit._ncallbacks() - before\n"
        "hcrepo.testing.RedisServer().close()\n"
        "first = atexit._ncallbacks() - before\n"
        "hcrepo.testing.RedisServer().close()\n"
        "print(imported, first, atexit._ncallbacks() - before)\n"
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "0 1 1\n"


def test_a_server_nobody_closed_is_closed_at_interpreter_exit() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="hcrepo-leftover-test-"))
    scratch.chmod(0o755)  # reachable by the service user
    try:
        result = _python(
            "import sys\n"
            "from pathlib import Path\n"
            "from hcrepo.testing import RedisServer\n"
            "server = RedisServer(base_dir=Path(sys.argv[1])).start()\n"
            "print(server.port, server.client().info('server')['process_id'])\n",
            str(scratch),
        )
        assert (result.returncode, result.stderr) == (0, "")
        port, pid = map(int, result.stdout.split())
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening:  # the hook failed: do not leave its server behind
            os.kill(pid, signal.SIGKILL)
        assert not listening
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_APPLICATION_TESTS = '''
import psycopg

made = []


def scalar(url, query, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchone()[0]


def test_a_primary_its_replica_and_redis(
    hcrepo_postgres, hcrepo_replica, hcrepo_wait_replayed, hcrepo_redis
):
    with psycopg.connect(hcrepo_postgres.superuser_url, autocommit=True) as conn:
        conn.execute("create table written (x int)")
        conn.execute("insert into written values (7)")
    hcrepo_wait_replayed(hcrepo_replica)
    assert scalar(hcrepo_replica.superuser_url, "select x from written") == 7
    assert scalar(hcrepo_replica.superuser_url, "select pg_is_in_recovery()") is True
    with hcrepo_redis.client() as client:
        assert client.ping()


def test_a_database_of_its_own_handed_to_the_owner_role(hcrepo_database):
    made.append(hcrepo_database.dbname)
    hcrepo_database.bootstrap(owner_password="app-owner")
    owner = scalar(
        hcrepo_database.superuser_url,
        "select pg_get_userbyid(datdba) from pg_database where datname = current_database()",
    )
    assert owner == "hcrepo_owner"


def test_the_database_is_dropped_after_its_test(hcrepo_postgres):
    assert len(made) == 1
    query = "select count(*) from pg_database where datname = %s"
    assert scalar(hcrepo_postgres.superuser_url, query, made) == 0
'''


def test_an_application_suite_gets_servers_and_databases_from_the_plugin(
    tmp_path: Path,
) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["hcrepo.testing.plugin"]\n')
    (tmp_path / "test_application.py").write_text(_APPLICATION_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         str(tmp_path)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 passed" in result.stdout
