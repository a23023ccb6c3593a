"""Read-your-writes belongs to the `db.context` block: shared with the workers bound to it,
gone for the next unrelated block on the same thread, and recorded for every commit, with or
without replicas, including writes a read-classified query makes inside a unit of work."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from hcrepo import Repository, bind_context, query
from tests.support.routing import DBNAME, Cluster

WAIT = 10.0


class Note(BaseModel):
    port: int
    note: str | None


class Notes(Repository, sql="sql/scopes.sql", tenant=False):
    @query("find_note")
    def find(self, *, id: int) -> Note: ...

    @query("add_note")
    def add(self, *, note: str) -> int: ...

    @query("add_note_by_function")
    def add_by_function(self, *, note: str) -> int: ...


@pytest.fixture(scope="module")
def notes_function(routing_schema: None, pg_primary: Any) -> None:
    with psycopg.connect(
        pg_primary.url(password=pg_primary.superuser_password, dbname=DBNAME), autocommit=True
    ) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION scopes_add_note(note text) RETURNS bigint VOLATILE "
            "LANGUAGE sql AS $$ INSERT INTO routing_items (note) VALUES (note) RETURNING id $$"
        )


def actor() -> dict[str, Any]:
    return {"actor_id": uuid.uuid4()}


def test_a_bound_workers_write_is_seen_by_the_block_that_bound_it(cluster: Cluster) -> None:
    db = cluster.database()
    with cluster.replay_paused(*cluster.replicas), db.context(**actor()), \
            ThreadPoolExecutor(1) as pool:
        new_id = pool.submit(bind_context(lambda: Notes(db).add(note="from a worker")))
        found = Notes(db).find(id=new_id.result(WAIT))
        assert found.note == "from a worker"
        assert found.port == cluster.primary.port  # the replicas have not replayed it


def test_the_next_block_on_a_thread_does_not_inherit_the_last_ones_position(
    cluster: Cluster,
) -> None:
    db = cluster.database()

    def request(write: bool) -> str | None:
        with db.context(**actor()):
            if write:
                Notes(db).add(note="a request that wrote")
            return db.last_write_token()

    with ThreadPoolExecutor(1) as pool:  # one worker thread serving request after request
        assert pool.submit(request, True).result(WAIT) is not None
        assert pool.submit(request, False).result(WAIT) is None
    assert db.last_write_token() is None  # nor does the code outside every block


def test_a_token_is_recorded_without_replicas_for_a_process_that_has_them(
    cluster: Cluster,
) -> None:
    producer = cluster.database(read_replica_urls=[])
    consumer = cluster.database()
    with cluster.replay_paused(*cluster.replicas):
        with producer.context(**actor()):
            new_id = Notes(producer).add(note="handed on")
            token = producer.last_write_token()
        assert token is not None
        with consumer.read_after(token):
            found = Notes(consumer).find(id=new_id)
        assert found.note == "handed on"
        assert found.port == cluster.primary.port


def test_a_write_made_by_a_read_query_in_a_unit_of_work_is_read_back(
    cluster: Cluster, notes_function: None
) -> None:
    db = cluster.database()
    with cluster.replay_paused(*cluster.replicas), db.context(**actor()):
        with db.unit_of_work() as uow:
            new_id = Notes(uow).add_by_function(note="written by a function")
        found = Notes(db).find(id=new_id)
        assert found.note == "written by a function"
        assert found.port == cluster.primary.port
