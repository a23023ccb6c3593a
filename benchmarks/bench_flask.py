"""One patient read by a Flask view, through hcrepo.flask and written by hand.

Two apps, each served by waitress (8 threads) on its own port in this process, answer
`GET /patients/<id>` with the same JSON for the clinic and actor of the request headers:

- hcrepo.flask: `HcRepo` with the header resolver opens the request's context around the
  view, which calls `PatientRepository.get` (cache off) and dumps the model;
- by hand: the view checks the ids, takes a psycopg_pool connection (autocommit) and sends
  the same transaction-local `set_config` of clinic and actor and the same query in one
  pipeline (one round trip), then turns the row into the same JSON.

One client, a keep-alive connection per server, alternates short slices in the harness's
balanced orders; the figure is the median time per request of all slices. Target: hcrepo.flask
/ by hand <= 1.10.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import uuid
from datetime import date, datetime
from typing import Any

import psycopg_pool
import waitress.server
from flask import Flask, request
from flask.typing import ResponseReturnValue
from psycopg.rows import dict_row

from benchmarks.harness import interleaved, stack, table
from hcrepo import Settings
from hcrepo.flask import HcRepo, from_headers
from hcrepo.healthcare import PatientRepository

CONNECTIONS = 4
THREADS = 8
HCREPO = "hcrepo.flask (HcRepo, PatientRepository.get)"
BY_HAND = "by hand (psycopg_pool, set_config + query in one pipeline)"
_SET_CONTEXT = (
    "SELECT set_config('app.clinic_id', %s, true), set_config('app.actor_id', %s, true)"
)
_GET_PATIENT = (
    "SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, "
    "address, ssn, created_at, updated_at FROM patients WHERE id = %s"
)


def hcrepo_app(settings: Settings) -> tuple[Flask, HcRepo]:
    app = Flask("bench_hcrepo")
    hc = HcRepo(app, settings=settings, resolver=from_headers())

    @app.get("/patients/<uuid:patient_id>")
    def patient(patient_id: uuid.UUID) -> ResponseReturnValue:
        found = PatientRepository(hc.db).get(id=patient_id)
        if found is None:
            return {"error": "NotFound"}, 404
        return found.model_dump(mode="json", exclude={"ssn"})

    return app, hc


def by_hand_app(pool: psycopg_pool.ConnectionPool[Any]) -> Flask:
    app = Flask("bench_by_hand")

    @app.get("/patients/<uuid:patient_id>")
    def patient(patient_id: uuid.UUID) -> ResponseReturnValue:
        try:
            clinic = str(uuid.UUID(request.headers["X-Clinic-Id"]))
            actor = request.headers.get("X-Actor-Id")
            actor = str(uuid.UUID(actor)) if actor else ""
        except (KeyError, ValueError):
            return {"error": "InvalidContext"}, 400
        with pool.connection() as conn, conn.pipeline():
            conn.execute(_SET_CONTEXT, (clinic, actor))
            row = conn.cursor(row_factory=dict_row).execute(_GET_PATIENT, (patient_id,)).fetchone()
        if row is None:
            return {"error": "NotFound"}, 404
        del row["ssn"]
        return {name: _as_json(value) for name, value in row.items()}

    return app


def _as_json(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value) if isinstance(value, uuid.UUID) else value


def _instants(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with ISO dates and times parsed: pydantic writes UTC as Z, isoformat +00:00."""
    parsed: dict[str, Any] = {}
    for name, value in body.items():
        try:
            parsed[name] = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            parsed[name] = value
    return parsed


class Served:
    """`app` on waitress in a thread, and one keep-alive client connection to it."""

    def __init__(self, app: Flask, headers: dict[str, str]) -> None:
        self._server = waitress.server.create_server(app, host="127.0.0.1", port=0,
                                                     threads=THREADS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._client = http.client.HTTPConnection("127.0.0.1", self._server.effective_port,
                                                  timeout=30)
        self._headers = headers

    def _serve(self) -> None:
        # Short loops until told to stop: closing the server under a running loop's select()
        # fails it with a bad file descriptor.
        while not self._stop.is_set():
            self._server.asyncore.loop(timeout=0.05, map=self._server._map, count=1)

    def get(self, path: str) -> bytes:
        self._client.request("GET", path, headers=self._headers)
        response = self._client.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"{path} answered {response.status}")
        return body

    def close(self) -> None:
        self._client.close()
        self._stop.set()
        self._thread.join(30)
        self._server.close()
        self._server.task_dispatcher.shutdown()


def main() -> str:
    with stack() as s:
        headers = {"X-Clinic-Id": str(s.clinic_id), "X-Actor-Id": str(s.actor_id)}
        settings = Settings(database_url=s.app_url, redis_url="", pool_min=CONNECTIONS,
                            pool_max=CONNECTIONS)
        app, hc = hcrepo_app(settings)
        pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            s.app_url, kwargs={"autocommit": True}, min_size=CONNECTIONS,
            max_size=CONNECTIONS, open=True,
        )
        pool.wait()
        servers = {HCREPO: Served(app, headers), BY_HAND: Served(by_hand_app(pool), headers)}
        try:
            first = f"/patients/{s.patient_ids[0]}"
            answers = {name: _instants(json.loads(server.get(first)))
                       for name, server in servers.items()}
            assert answers[HCREPO] == answers[BY_HAND], "the two views answer differently"
            ids = itertools.cycle(s.patient_ids[:500])
            medians = interleaved({
                name: lambda server=server: server.get(f"/patients/{next(ids)}")
                for name, server in servers.items()
            }, rounds=60, calls_per_slice=40)
        finally:
            for server in servers.values():
                server.close()
            hc.close()
            pool.close()
    out = table(medians, BY_HAND, "A Flask view reading one patient (waitress, one client)")
    return out + (f"\n\nhcrepo.flask / by hand (target <= 1.10): "
                  f"{medians[HCREPO] / medians[BY_HAND]:.2f}")


if __name__ == "__main__":
    print(main())
