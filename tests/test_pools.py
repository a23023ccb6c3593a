"""Pool hygiene on real servers: lazy pools rebuilt in a forked child, the leak warning, and
the PoolTimeout that exhaustion raises."""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from typing import Any

import pytest

from hcrepo import PoolTimeout
from tests.support.routing import Cluster, LogSink, Routing, ports, until


def _backend_pid(node: Any) -> int:
    with node.connection() as conn:
        return int(conn.info.backend_pid)


def test_forked_child_runs_on_its_own_pools(cluster: Cluster) -> None:
    db = cluster.database(pool_min=1, pool_max=1)
    router = db._router
    replica_ports = {replica.port for replica in cluster.replicas}
    assert set(ports(db, 4)) == replica_ports  # every pool is open now
    parent_pids = [_backend_pid(node) for node in (router.primary, *router.replicas)]

    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report over the pipe, never return into pytest
        code = 1
        try:
            os.close(reader)
            with db.context(actor_id=uuid.uuid4()), db.unit_of_work() as uow:
                Routing(uow).add_note(note="from the child")
            report = {
                "ports": sorted(ports(db, 4)),
                "pids": [_backend_pid(node) for node in (router.primary, *router.replicas)],
            }
            os.write(writer, json.dumps(report).encode())
            code = 0
        except BaseException as exc:
            os.write(writer, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        report = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert set(report["ports"]) == replica_ports
    # The child connected afresh to every node; the parent's sessions are still its own.
    assert not set(report["pids"]) & set(parent_pids)
    assert [_backend_pid(node) for node in (router.primary, *router.replicas)] == parent_pids
    assert set(ports(db, 4)) == replica_ports


def test_a_held_connection_warns_once_with_where_it_was_taken(
    cluster: Cluster, log_sink: Any
) -> None:
    logs: LogSink = log_sink("WARNING")
    db = cluster.database(pool_leak_threshold=0.05)
    monitor = db._router.monitor
    with db._router.primary.connection():
        taken_at = sys._getframe().f_lineno - 1

        def warned() -> bool:
            monitor.check_now()
            return bool(logs.matching("has been held"))

        until(warned, "the leak warning")
        monitor.check_now()
        monitor.check_now()
    warnings = logs.matching("has been held")
    assert len(warnings) == 1
    assert "primary" in warnings[0]
    assert "HCREPO_POOL_LEAK_THRESHOLD=0.05s" in warnings[0]
    assert f'test_pools.py", line {taken_at}, in test_a_held_connection' in warnings[0]
    assert db._router.primary.leaks.value == 1


def test_a_slow_read_warns_with_the_application_stack(cluster: Cluster, log_sink: Any) -> None:
    logs: LogSink = log_sink("WARNING")
    db = cluster.database(pool_leak_threshold=0.05)
    monitor = db._router.monitor
    done = threading.Event()
    started = threading.Event()

    def slow_request() -> None:
        started.set()
        Routing(db).slow_where_am_i(seconds=1.0)
        done.set()

    reader = threading.Thread(target=slow_request)
    reader.start()
    started.wait(10)

    def warned() -> bool:
        monitor.check_now()
        return bool(logs.matching("has been held"))

    until(warned, "the leak warning for the slow read")
    reader.join(30)
    assert done.is_set()
    [warning] = logs.matching("has been held")
    assert "replica" in warning
    # Read while the connection was still out: the caller chain down to the repository call.
    assert "in slow_request" in warning and "Routing(db).slow_where_am_i" in warning
    assert "hcrepo/database.py" in warning and "in read" in warning


def test_exhaustion_raises_pool_timeout_with_the_pool_stats(cluster: Cluster) -> None:
    db = cluster.database(read_replica_urls=[], pool_min=0, pool_max=2, pool_acquire_timeout=0.2)
    primary = db._router.primary
    with primary.connection(), primary.connection():
        taken_at = sys._getframe().f_lineno - 1
        with pytest.raises(PoolTimeout) as raised:
            Routing(db).where_am_i()
    message = str(raised.value)
    assert message.startswith(f"primary ({primary.address}): no connection within 0.2s")
    assert "'pool_max': 2" in message and "'pool_size': 2" in message
    assert "'pool_available': 0" in message
    assert "2 held for " in message
    assert f"test_pools.py:{taken_at} in test_exhaustion" in message
    assert Routing(db).where_am_i() == cluster.primary.port  # released: usable again


def test_too_many_waiting_callers_raise_pool_timeout(cluster: Cluster) -> None:
    db = cluster.database(
        read_replica_urls=[], pool_min=0, pool_max=1, pool_max_waiting=1,
        pool_acquire_timeout=10.0,
    )
    primary = db._router.primary
    served = threading.Event()

    def wait_for_a_connection() -> None:
        with primary.connection():
            served.set()

    waiter = threading.Thread(target=wait_for_a_connection)
    with primary.connection():
        waiter.start()
        until(lambda: primary.pool.get_stats().get("requests_waiting") == 1, "a waiting caller")
        with pytest.raises(PoolTimeout, match="HCREPO_POOL_MAX_WAITING=1"):
            primary.acquire()
    waiter.join(30)
    assert served.is_set()


def test_exhaustion_names_the_application_line_behind_a_unit_of_work(cluster: Cluster) -> None:
    db = cluster.database(read_replica_urls=[], pool_min=0, pool_max=1, pool_acquire_timeout=0.2)
    with db.context(actor_id=uuid.uuid4()), db.unit_of_work():
        taken_at = sys._getframe().f_lineno - 1
        with pytest.raises(PoolTimeout) as raised:
            Routing(db).where_am_i()
    message = str(raised.value)
    # The first frame outside hcrepo, not hcrepo's own unit_of_work.py or database.py.
    assert f"the longest taken at {__file__}:{taken_at} in test_exhaustion_names" in message
