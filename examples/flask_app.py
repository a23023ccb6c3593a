"""A small clinic API over hcrepo.healthcare, with hcrepo.flask doing the plumbing.

    DATABASE_URL=postgresql://hcrepo_app:...@db/clinic \\
    READ_REPLICA_URLS=postgresql://hcrepo_app:...@replica/clinic REDIS_URL=redis://cache \\
    python examples/flask_app.py            # waitress, 8 threads, on $PORT (default 8080)

Who is asking comes from the `X-Clinic-Id` and `X-Actor-Id` headers, which is only right
behind a gateway that authenticates every request and sets those headers itself; with
`APP_JWT_SECRET` set, from the claims of a verified HS256 bearer token instead.

    GET  /patients?name=&date_of_birth=&mrn=&sort=&limit=    search (summaries)
    GET  /patients/<id>                                       detail (no SSN)
    POST /appointments        {patient_id, provider_id, starts_at, ends_at, reason?}
    GET  /appointments/<id>
    POST /appointments/<id>/cancel
    POST /appointments/<id>/reschedule                        {starts_at, ends_at}
    GET  /healthz  /readyz  /metrics                          (hcrepo.flask)

hcrepo's errors become JSON responses (a double booking is a 409, an unknown patient a 404,
no clinic a 401); a request that wrote gets a read-your-writes token back (cookie and
`X-Hcrepo-Token`) so that its next request reads its own writes, even from a replica.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import date
from typing import Any, TypeVar
from uuid import UUID

from flask import Flask, Response, jsonify, request
from pydantic import AwareDatetime, BaseModel, ValidationError

from hcrepo import Database
from hcrepo.flask import HcRepo, Resolver, from_headers, from_jwt
from hcrepo.healthcare import AppointmentRepository, PatientRepository

M = TypeVar("M", bound=BaseModel)


class Booking(BaseModel):
    patient_id: UUID
    provider_id: UUID
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    reason: str | None = None


class Search(BaseModel):
    name: str | None = None
    mrn: str | None = None
    date_of_birth: date | None = None
    sort: str = "last_name"  # hcrepo checks it against the query's whitelist (400 if not)
    limit: int = 50  # and this against its page cap


class Slot(BaseModel):
    starts_at: AwareDatetime
    ends_at: AwareDatetime


def create_app(
    db_factory: Callable[[], Database] = Database.from_env,
    *,
    resolver: Resolver | None = None,
    **options: Any,
) -> Flask:
    """The app; `options` go to HcRepo (paths, token transport)."""
    app = Flask(__name__)
    hc = HcRepo(app, database=db_factory, resolver=resolver or from_headers(), **options)

    @app.errorhandler(ValidationError)
    def invalid_body(error: ValidationError) -> tuple[Response, int]:
        # Field names and rule types only: pydantic's messages quote the input.
        fields = [{"field": ".".join(map(str, e["loc"])), "type": e["type"]}
                  for e in error.errors(include_input=False)]
        return jsonify(error="ValidationError", fields=fields), 400

    def body(model: type[M]) -> M:
        return model.model_validate(request.get_json(force=True, silent=True) or {})

    @app.get("/patients")
    def search_patients() -> Any:
        search = Search.model_validate(request.args.to_dict())
        found = PatientRepository(hc.db).search(**search.model_dump())
        return [patient.model_dump(mode="json") for patient in found]

    @app.get("/patients/<uuid:patient_id>")
    def patient_detail(patient_id: UUID) -> Any:
        patient = PatientRepository(hc.db).get(id=patient_id)
        if patient is None:
            return {"error": "NotFound", "message": "no such patient"}, 404
        return patient.model_dump(mode="json", exclude={"ssn"})

    @app.post("/appointments")
    def book() -> Any:
        booked = AppointmentRepository(hc.db).book(**body(Booking).model_dump())
        return booked.model_dump(mode="json"), 201

    @app.get("/appointments/<uuid:appointment_id>")
    def appointment_detail(appointment_id: UUID) -> Any:
        found = AppointmentRepository(hc.db).get(id=appointment_id)
        if found is None:
            return {"error": "NotFound", "message": "no such appointment"}, 404
        return found.model_dump(mode="json")

    @app.post("/appointments/<uuid:appointment_id>/cancel")
    def cancel(appointment_id: UUID) -> Any:
        if not AppointmentRepository(hc.db).cancel(id=appointment_id):
            return {"error": "NotFound", "message": "no open appointment with that id"}, 404
        return {"status": "cancelled"}

    @app.post("/appointments/<uuid:appointment_id>/reschedule")
    def reschedule(appointment_id: UUID) -> Any:
        slot = body(Slot)
        moved = AppointmentRepository(hc.db).reschedule(
            id=appointment_id, starts_at=slot.starts_at, ends_at=slot.ends_at
        )
        if moved is None:
            return {"error": "NotFound", "message": "no scheduled appointment with that id"}, 404
        return moved.model_dump(mode="json")

    return app


def main() -> None:
    import waitress  # type: ignore[import-untyped]

    secret = os.environ.get("APP_JWT_SECRET")
    resolver = from_jwt(secret, algorithms=["HS256"]) if secret else from_headers()
    app = create_app(resolver=resolver)
    waitress.serve(app, host=os.environ.get("HOST", "127.0.0.1"),
                   port=int(os.environ.get("PORT", "8080")), threads=8)


if __name__ == "__main__":
    main()
