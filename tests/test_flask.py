"""hcrepo.flask and examples/flask_app.py against real servers, served by waitress.

Each request runs its view inside its own `db.context` block (clinic and actor from the
resolver), reads after the read-your-writes token it carried, hands back a token only when
it wrote, and turns hcrepo's errors into JSON responses without values.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import jwt
import pytest
from flask import Flask, g, request

from examples.flask_app import create_app
from hcrepo import (
    CommitOutcomeUnknown,
    ConfigError,
    ConnectionLost,
    Database,
    Settings,
    TenantContextMissing,
)
from hcrepo.flask import HcRepo, from_g, from_headers, from_jwt
from hcrepo.healthcare import PatientRepository, ProviderRepository
from hcrepo.testing import PostgresServer, RedisServer
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.servers import WaitReplayed
from tests.support.repos import Clinic, Session, new_clinic
from tests.support.routing import Cluster, until
from tests.support.wsgi import served

WAIT = 10.0
SECRET = "test-secret-for-hs256-signing-only-32b"
MONDAY = datetime(2031, 3, 3, 9, tzinfo=UTC)


# --- serving and calling --------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def token(self) -> str | None:
        return self.headers.get("x-hcrepo-token")


def call(port: int, method: str, path: str, *, headers: dict[str, str] | None = None,
         body: object = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
        is_json = found.get("content-type", "").startswith("application/json")
        return Reply(response.status, found, json.loads(raw) if is_json else raw)
    finally:
        conn.close()


def who(clinic: Clinic, *, actor: bool = True) -> dict[str, str]:
    found = {"X-Clinic-Id": str(clinic.id)}
    if actor:
        found["X-Actor-Id"] = str(clinic.actor_id)
    return found


def booking(clinic: Clinic, slot: int, patient: int = 0) -> dict[str, Any]:
    starts = MONDAY + timedelta(minutes=30 * slot)
    return {"patient_id": str(clinic.patient_ids[patient]),
            "provider_id": str(clinic.provider_ids[0]),
            "starts_at": starts.isoformat(),
            "ends_at": (starts + timedelta(minutes=30)).isoformat()}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def extensions() -> Iterator[list[HcRepo]]:
    """HcRepos made by a test, closed after it."""
    made: list[HcRepo] = []
    yield made
    for extension in made:
        extension.close()


@pytest.fixture
def app_settings(migrated_db: ServerDatabase) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        options: dict[str, Any] = {"database_url": migrated_db.app_url, "redis_url": "",
                                   "pool_min": 1, "pool_max": 8, **overrides}
        return Settings(**options)

    return make


@pytest.fixture
def example(
    app_settings: Callable[..., Settings], extensions: list[HcRepo]
) -> Callable[..., Flask]:
    """The example app on a Database made from `app_settings(**overrides)`."""

    def make(**overrides: Any) -> Flask:
        settings = app_settings(**overrides)
        app = create_app(lambda: Database(settings))
        extensions.append(app.extensions["hcrepo"])
        return app

    return make


@pytest.fixture
def three(migrated_db: ServerDatabase) -> list[Clinic]:
    return [new_clinic(migrated_db.superuser_url, providers=1, patients=3) for _ in range(3)]


# --- the example app, concurrently ----------------------------------------------------------


def test_three_clinics_at_once_see_only_their_own_rows(
    example: Callable[..., Flask], three: list[Clinic], redis_server: RedisServer
) -> None:
    app = example(redis_url=redis_server.url)
    owner = {pid: clinic.id for clinic in three for pid in clinic.patient_ids}

    def visit(n: int, port: int) -> list[str]:
        """One client's few requests; returns what went wrong (empty: nothing)."""
        mine, other = three[n % 3], three[(n + 1) % 3]
        wrong: list[str] = []
        replies = [call(port, "GET", "/patients?limit=10", headers=who(mine))]
        if replies[0].status == 200 and {owner.get(UUID(p["id"])) for p in replies[0].body} \
                != {mine.id}:
            wrong.append("search crossed clinics")
        patient = mine.patient_ids[n % 3]
        replies.append(call(port, "GET", f"/patients/{patient}", headers=who(mine)))
        if replies[-1].status == 200 and replies[-1].body["clinic_id"] != str(mine.id):
            wrong.append("detail crossed clinics")
        foreign = call(port, "GET", f"/patients/{other.patient_ids[0]}", headers=who(mine))
        if foreign.status != 404:
            wrong.append(f"another clinic's patient answered {foreign.status}")
        booked = call(port, "POST", "/appointments", headers=who(mine),
                      body=booking(mine, slot=n // 3 % 8, patient=n % 3))
        replies += [foreign, booked]
        if booked.status == 201:
            if booked.body["clinic_id"] != str(mine.id):
                wrong.append("booking crossed clinics")
            path = f"/appointments/{booked.body['id']}"
            read = call(port, "GET", path,
                        headers={**who(mine), "X-Hcrepo-Token": booked.token or ""})
            replies += [read, call(port, "POST", f"{path}/cancel", headers=who(mine))]
            if read.status != 200 or read.body["clinic_id"] != str(mine.id):
                wrong.append(f"own booking read back as {read.status}")
        elif booked.status != 409:
            wrong.append(f"booking answered {booked.status}")
        wrong += [f"{r.status} {r.body}" for r in replies if r.status >= 500]
        return wrong

    with served(app, threads=8) as port, ThreadPoolExecutor(12) as clients:
        futures = [clients.submit(visit, n, port) for n in range(60)]
        problems = [problem for future in futures for problem in future.result(WAIT * 6)]
    assert problems == []


def test_a_writer_reads_its_write_back_while_the_replica_is_behind(
    example: Callable[..., Flask],
    migrated_db: ServerDatabase,
    pg_replica: PostgresServer,
    cluster: Cluster,
    wait_replayed: WaitReplayed,
    three: list[Clinic],
) -> None:
    clinic = three[0]
    wait_replayed(pg_replica)  # the clinic's rows are on the replica
    # The monitor stays out of the way: the paused replica must stay in rotation.
    app = example(read_replica_urls=[migrated_db.replica_app_url(pg_replica)],
                  health_interval=60.0, max_lag_seconds=60.0)
    with served(app, threads=8) as port, cluster.replay_paused(pg_replica):
        booked = call(port, "POST", "/appointments", headers=who(clinic),
                      body=booking(clinic, slot=0))
        assert booked.status == 201 and booked.token is not None
        assert booked.headers["set-cookie"].startswith(f"hcrepo_rw={booked.token};")
        path = f"/appointments/{booked.body['id']}"
        # Without the token the read goes to the replica, which has not replayed the booking.
        assert call(port, "GET", path, headers=who(clinic)).status == 404
        by_cookie = call(port, "GET", path,
                         headers={**who(clinic), "Cookie": f"hcrepo_rw={booked.token}"})
        by_header = call(port, "GET", path, headers={**who(clinic),
                                                     "X-Hcrepo-Token": booked.token})
        assert (by_cookie.status, by_header.status) == (200, 200)
        assert by_cookie.body["id"] == booked.body["id"]
        # Reading sets no token of its own; a malformed one is ignored, not an error.
        assert by_cookie.token is None and "set-cookie" not in by_cookie.headers
        garbled = call(port, "GET", "/patients", headers={**who(clinic),
                                                           "X-Hcrepo-Token": "not-an-lsn"})
        assert garbled.status == 200


def test_a_request_does_not_inherit_the_previous_requests_position_on_its_thread(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    clinic = three[0]
    app = Flask(__name__)
    hc = HcRepo(app, settings=app_settings(), resolver=from_headers())
    extensions.append(hc)

    @app.post("/write")
    def write() -> Any:
        ProviderRepository(hc.db).set_on_call(id=clinic.provider_ids[0], on_call=True)
        return {"position": hc.db.last_write_token()}

    @app.get("/position")
    def position() -> Any:
        return {"position": hc.db.last_write_token(), "count": _count_or_refused(hc.db)}

    with served(app, threads=1) as port:  # one worker thread serves both requests
        first = call(port, "POST", "/write", headers=who(clinic))
        second = call(port, "GET", "/position")
    assert first.status == 200 and first.body["position"] == first.token is not None
    assert second.body == {"position": None, "count": "refused"}
    assert second.token is None and "set-cookie" not in second.headers


def _count_or_refused(db: Database) -> int | str:
    try:
        return PatientRepository(db).count()
    except TenantContextMissing:
        return "refused"


def test_the_example_books_reschedules_and_cancels(
    example: Callable[..., Flask], three: list[Clinic]
) -> None:
    a = three[0]
    client = example().test_client()
    first = client.post("/appointments", json=booking(a, slot=0), headers=who(a)).get_json()
    second = client.post("/appointments", json=booking(a, slot=1, patient=1),
                         headers=who(a)).get_json()
    later = booking(a, slot=4)
    slot = {"starts_at": later["starts_at"], "ends_at": later["ends_at"]}
    moved = client.post(f"/appointments/{first['id']}/reschedule", json=slot, headers=who(a))
    assert moved.status_code == 200
    assert datetime.fromisoformat(moved.get_json()["starts_at"]) == MONDAY + timedelta(hours=2)
    taken = client.post(f"/appointments/{second['id']}/reschedule", json=slot, headers=who(a))
    assert (taken.status_code, taken.get_json()["error"]) == (409, "ExclusionViolation")
    assert client.post(f"/appointments/{first['id']}/cancel", headers=who(a)).status_code == 200
    assert client.get(f"/appointments/{first['id']}",
                      headers=who(a)).get_json()["status"] == "cancelled"
    again = client.post(f"/appointments/{first['id']}/cancel", headers=who(a))
    gone = client.post(f"/appointments/{first['id']}/reschedule", json=slot, headers=who(a))
    bad = client.post(f"/appointments/{second['id']}/reschedule", json={"starts_at": "soon"},
                      headers=who(a))
    assert (again.status_code, gone.status_code, bad.status_code) == (404, 404, 400)
    assert "soon" not in bad.get_data(as_text=True)


# --- errors as HTTP -------------------------------------------------------------------------


def test_hcrepo_errors_become_json_without_values(
    example: Callable[..., Flask], three: list[Clinic]
) -> None:
    a, b, _ = three
    client = example().test_client()
    body = booking(a, slot=1)
    assert client.post("/appointments", json=body, headers=who(a)).status_code == 201
    double = client.post("/appointments", json=booking(a, slot=1, patient=1), headers=who(a))
    cases = {
        "no clinic": (client.get("/patients"), 401, "TenantContextMissing"),
        "no actor": (client.post("/appointments", json=booking(a, slot=2),
                                 headers=who(a, actor=False)), 403, "ActorRequired"),
        "unknown provider": (client.post("/appointments", json=booking(b, slot=2) | {
            "patient_id": str(b.patient_ids[0]), "provider_id": str(a.provider_ids[0])},
            headers=who(b)), 404, "NotFound"),
        "double booking": (double, 409, "ExclusionViolation"),
        "bad clinic id": (client.get("/patients", headers={"X-Clinic-Id": "nope"}), 400,
                          "InvalidContext"),
        "bad sort": (client.get("/patients?sort=ssn", headers=who(a)), 400, "InvalidOrderBy"),
        "page too big": (client.get("/patients?limit=1000", headers=who(a)), 400,
                         "PageSizeExceeded"),
    }
    got = {name: (r.status_code, (r.get_json() or {}).get("error")) for name, (r, _, _) in
           cases.items()}
    assert got == {name: (status, error) for name, (_, status, error) in cases.items()}
    for response, _, _ in cases.values():
        text = response.get_data(as_text=True)
        assert not any(value in text for value in (body["starts_at"], body["patient_id"],
                                                   str(a.provider_ids[0]), "nope", "ssn"))
    assert "WWW-Authenticate" not in cases["no clinic"][0].headers  # headers: no challenge


def test_errors_of_busy_or_lost_servers_and_type_errors(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    clinic = three[0]
    app = Flask(__name__)
    hc = HcRepo(app, settings=app_settings(pool_min=1, pool_max=1, pool_acquire_timeout=0.2,
                                           breaker_reset=3.0), resolver=from_headers())
    extensions.append(hc)

    @app.get("/busy")
    def busy() -> Any:
        with hc.db.unit_of_work() as uow:  # holds the only connection
            PatientRepository(uow).count()
            return {"count": PatientRepository(hc.db).count()}  # needs another: PoolTimeout

    @app.get("/raise/<kind>")
    def raise_kind(kind: str) -> Any:
        if kind == "lost":
            raise ConnectionLost("primary: connection lost", sqlstate="08006")
        if kind == "unknown":
            raise CommitOutcomeUnknown("COMMIT outcome unknown", sqlstate="08006")
        if kind == "bad-argument":
            return PatientRepository(hc.db).get(id="not-a-uuid")  # type: ignore[arg-type]
        return len(5)  # type: ignore[arg-type]  # the view's own bug

    client = app.test_client()
    replies = {path: client.get(path, headers=who(clinic)) for path in (
        "/busy", "/raise/lost", "/raise/unknown", "/raise/bad-argument", "/raise/bug")}
    assert {path: r.status_code for path, r in replies.items()} == {
        "/busy": 503, "/raise/lost": 503, "/raise/unknown": 500, "/raise/bad-argument": 400,
        "/raise/bug": 500}
    assert replies["/busy"].get_json()["error"] == "PoolTimeout"
    assert replies["/busy"].headers["Retry-After"] == replies["/raise/lost"].headers[
        "Retry-After"] == "3"
    assert replies["/raise/unknown"].get_json()["error"] == "CommitOutcomeUnknown"
    assert "Retry-After" not in replies["/raise/unknown"].headers
    bad = replies["/raise/bad-argument"].get_json()
    assert bad["error"] == "TypeError" and "not-a-uuid" not in bad["message"]
    assert replies["/raise/bug"].content_type.startswith("text/html")  # Flask's own 500


# --- resolvers ------------------------------------------------------------------------------


def _jwt_app(app_settings: Callable[..., Settings], extensions: list[HcRepo]) -> Flask:
    app = create_app(lambda: Database(app_settings()),
                     resolver=from_jwt(SECRET, algorithms=["HS256"], audience="clinic-api"))
    extensions.append(app.extensions["hcrepo"])
    return app


def _bearer(clinic: Clinic, *, expires_in: float = 60, secret: str = SECRET) -> dict[str, str]:
    claims = {"clinic_id": str(clinic.id), "sub": str(clinic.actor_id), "aud": "clinic-api",
              "exp": datetime.now(UTC) + timedelta(seconds=expires_in)}
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}


def test_the_jwt_resolver_takes_clinic_and_actor_from_verified_claims(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    a = three[0]
    client = _jwt_app(app_settings, extensions).test_client()
    ok = client.get("/patients", headers=_bearer(a))
    assert ok.status_code == 200
    assert {p["id"] for p in ok.get_json()} == {str(p) for p in a.patient_ids}
    assert client.post("/appointments", json=booking(a, slot=3),
                       headers=_bearer(a)).status_code == 201
    forged = _bearer(a, secret="another-secret-for-hs256-signing-32b")
    for headers in (_bearer(a, expires_in=-60), forged, {"Authorization": "Basic abc"}):
        refused = client.get("/patients", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.get_json()["error"] == "InvalidCredentials"
        assert str(a.id) not in refused.get_data(as_text=True)
    assert client.get("/patients").get_json()["error"] == "TenantContextMissing"


def test_the_staff_role_travels_from_every_resolver(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    """Header, JWT claim or flask.g: the role reaches PostgreSQL, which refuses a role the
    actor (a doctor) does not hold (403); a misspelt one is refused before any query (400)."""
    a = three[0]
    example_app = create_app(lambda: Database(app_settings()))
    extensions.append(example_app.extensions["hcrepo"])
    client = example_app.test_client()
    for role, status in (("doctor", 200), ("receptionist", 403), ("Doctor", 400)):
        reply = client.get("/patients", headers={**who(a), "X-Staff-Role": role})
        assert reply.status_code == status, role
    jwt_client = _jwt_app(app_settings, extensions).test_client()
    claims = {"clinic_id": str(a.id), "sub": str(a.actor_id), "aud": "clinic-api",
              "exp": datetime.now(UTC) + timedelta(seconds=60)}
    for role, status in (("doctor", 200), ("nurse", 403)):
        token = jwt.encode({**claims, "role": role}, SECRET, algorithm="HS256")
        reply = jwt_client.get("/patients", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == status, role
    with Flask(__name__).test_request_context():
        g.clinic_id, g.actor_id, g.role = a.id, a.actor_id, "nurse"
        found = from_g()(request)
    assert found is not None and found.role == "nurse"


def test_the_jwt_resolver_needs_pyjwt_when_it_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)  # what an environment without PyJWT has
    with pytest.raises(ConfigError, match="PyJWT"):
        from_jwt(SECRET, algorithms=["HS256"])


def test_the_g_resolver_reads_what_a_before_request_hook_stored(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    a = three[0]
    app = Flask(__name__)
    hc = HcRepo(app, settings=app_settings(), resolver=from_g())
    extensions.append(hc)

    @app.before_request
    def authenticate() -> None:
        g.clinic_id = a.id

    @app.get("/count")
    def count() -> Any:
        return {"count": PatientRepository(hc.db).count()}

    assert app.test_client().get("/count").get_json() == {"count": len(a.patient_ids)}


# --- health, readiness, metrics, processes --------------------------------------------------


def test_health_readiness_and_metrics(
    example: Callable[..., Flask], app_settings: Callable[..., Settings],
    extensions: list[HcRepo], three: list[Clinic]
) -> None:
    client = example().test_client()
    assert client.get("/patients", headers=who(three[0])).status_code == 200
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}
    metrics = client.get("/metrics")
    assert metrics.content_type.startswith("text/plain")
    assert 'query="search_patients"' in metrics.get_data(as_text=True)

    with socket_closed_port() as port:
        down = Flask(__name__)
        extensions.append(HcRepo(down, settings=app_settings(
            database_url=f"postgresql://hcrepo_app:x@127.0.0.1:{port}/none"),
            metrics_path=None, ready_timeout=1.0))
        down_client = down.test_client()
        assert down_client.get("/healthz").status_code == 200  # liveness needs no database
        ready = down_client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.get_json()["status"] == "unavailable"
        assert down_client.get("/metrics").status_code == 404


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A local port nothing listens on (bound, never listening, for the block)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_forked_worker_opens_a_database_of_its_own(
    app_settings: Callable[..., Settings], extensions: list[HcRepo], three: list[Clinic]
) -> None:
    a = three[0]
    app = Flask(__name__)
    # One connection: were the child to end the parent's session, the parent's next request
    # would run on a new backend.
    hc = HcRepo(app, settings=app_settings(pool_max=1), resolver=from_headers())
    extensions.append(hc)

    @app.get("/backend")
    def backend() -> Any:
        return {"count": PatientRepository(hc.db).count(), "pid": Session(hc.db).probe().pid,
                "db": id(hc.db)}

    client = app.test_client()
    parent = client.get("/backend", headers=who(a)).get_json()  # opened before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a worker: serve, close at exit, report
        try:
            got = client.get("/backend", headers=who(a)).get_json()
            hc.close()  # what atexit runs in a worker
            os.write(write, json.dumps(got).encode())
        finally:
            os._exit(0)  # not pytest's exit: its hooks are the parent's
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], WAIT * 2)
        child = json.loads(os.read(read, 4096)) if ready else None
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert child is not None and child["count"] == parent["count"] == len(a.patient_ids)
    assert child["db"] != parent["db"] and child["pid"] != parent["pid"]
    assert client.get("/backend", headers=who(a)).get_json() == parent


def test_the_example_serves_from_the_environment_and_exits_cleanly(
    migrated_db: ServerDatabase, three: list[Clinic]
) -> None:
    with socket_closed_port() as port:
        pass  # free again: the example binds it
    env = {**os.environ, "DATABASE_URL": migrated_db.app_url, "REDIS_URL": "",
           "PORT": str(port), "PYTHONPATH": os.pathsep.join(sys.path)}
    example = subprocess.Popen([sys.executable, "examples/flask_app.py"], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: _answers(port), "the example to listen", timeout=WAIT * 2)
        reply = call(port, "GET", "/patients", headers=who(three[0]))
        assert reply.status == 200 and len(reply.body) == len(three[0].patient_ids)
    finally:
        example.send_signal(signal.SIGINT)  # waitress stops; atexit closes the Database
        _, stderr = example.communicate(timeout=WAIT * 2)
    assert example.returncode == 0 and "Traceback" not in stderr


def _answers(port: int) -> bool:
    try:
        return call(port, "GET", "/healthz").status == 200
    except OSError:
        return False
