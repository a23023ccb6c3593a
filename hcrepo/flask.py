"""Flask integration (extra `flask`): `HcRepo(app)` or `HcRepo().init_app(app)`.

What a Flask app would otherwise write by hand:

- one `Database` per worker process, opened on first use (after any fork: gunicorn
  `--preload` imports the app in the master) and closed at exit;
- each request's clinic, actor and staff role, from a resolver (`from_g`, the default;
  `from_headers`; `from_jwt`), put in force for the view with `db.context`;
- read-your-writes across requests: the token of a request that wrote travels in a cookie
  and a response header, and the next request carrying it reads inside `db.read_after`;
- hcrepo errors as JSON responses holding the error class and its message (no values);
- `/healthz`, `/readyz` and `/metrics`.

A context belongs to the `with` block on the stack (hcrepo/tenancy.py), so it cannot be
opened in a `before_request` hook and closed in teardown: the extension wraps the app's
`dispatch_request`, which runs the view after the `before_request` hooks (so a resolver
may read what they set, such as `flask.g`) and before the `after_request` hooks. Those
hooks, teardown functions and a streamed response body (a generator consumed after the view
returned) run outside the block: a repository call made there has no clinic and is refused.
The rows of a repository stream opened in the view keep the view's context; any other call
in a generator needs its own `with db.context(...)`.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol
from uuid import UUID

import psycopg
from flask import Flask, Request, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST

from hcrepo.config import Settings
from hcrepo.database import Database
from hcrepo.errors import (
    PACKAGE_DIR,
    ActorRequired,
    CheckViolation,
    CommitOutcomeUnknown,
    ConfigError,
    ConnectionLost,
    DatabaseError,
    ExclusionViolation,
    ForeignKeyViolation,
    HcrepoError,
    InvalidContext,
    InvalidOrderBy,
    NotFound,
    PageSizeExceeded,
    PoolTimeout,
    RowSecurityViolation,
    SerializationFailure,
    TenantContextMissing,
    UniqueViolation,
)
from hcrepo.routing.consistency import InvalidToken
from hcrepo.routing.health import ProbeBusy, ProbePool, describe_error
from hcrepo.tenancy import Block

__all__ = [
    "HcRepo",
    "InvalidCredentials",
    "RequestContext",
    "Resolver",
    "current_db",
    "from_g",
    "from_headers",
    "from_jwt",
]

_EXTENSION = "hcrepo"
_WRITTEN = "_hcrepo_write_token"  # flask.g attribute: the token of this request's commits


class InvalidCredentials(HcrepoError):
    """A request's credentials were present but failed verification (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who a request acts as: its clinic, (for writes) its actor, and the staff role it
    claims (None: the actor's membership role in the clinic)."""

    clinic_id: UUID | str
    actor_id: UUID | str | None = None
    role: str | None = None


class Resolver(Protocol):
    """`(request) -> RequestContext | None`; None runs the request with no context, where
    hcrepo refuses every tenant-scoped call (HTTP 401). An optional `challenge` attribute is
    sent as `WWW-Authenticate` with a 401."""

    def __call__(self, request: Request, /) -> RequestContext | None: ...


def from_g(clinic: str = "clinic_id", actor: str = "actor_id", role: str = "role") -> Resolver:
    """The clinic, actor and role that the application's own authentication (a
    `before_request` hook) stored on `flask.g`; no clinic there, no context."""

    def resolve(request: Request, /) -> RequestContext | None:
        clinic_id = g.get(clinic)
        return None if clinic_id is None else RequestContext(clinic_id, g.get(actor),
                                                             g.get(role))

    return resolve


def from_headers(
    clinic: str = "X-Clinic-Id", actor: str = "X-Actor-Id", role: str = "X-Staff-Role"
) -> Resolver:
    """The clinic, actor and role from request headers. Only for deployments behind a trusted
    gateway that authenticates every request and sets (or strips) these headers itself: a
    client reaching the app directly could name any clinic."""

    def resolve(request: Request, /) -> RequestContext | None:
        clinic_id = request.headers.get(clinic)
        if not clinic_id:
            return None
        return RequestContext(clinic_id, request.headers.get(actor) or None,
                              request.headers.get(role) or None)

    return resolve


class _JwtResolver:
    challenge = "Bearer"

    def __init__(self, jwt: ModuleType, key: Any, options: dict[str, Any],
                 claims: tuple[str, str, str]) -> None:
        self._jwt = jwt
        self._key = key
        self._options = options
        self._clinic, self._actor, self._role = claims

    def __call__(self, request: Request, /) -> RequestContext | None:
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidCredentials("the Authorization header is not a bearer token")
        try:
            claims = self._jwt.decode(token.strip(), self._key, **self._options)
        except self._jwt.PyJWTError as exc:
            # The class only: PyJWT's messages can quote claims.
            raise InvalidCredentials(f"the bearer token was rejected ({type(exc).__name__})"
                                     ) from None
        clinic_id = claims.get(self._clinic)
        if clinic_id is None:
            return None
        return RequestContext(clinic_id, claims.get(self._actor), claims.get(self._role))


def from_jwt(
    key: Any,
    *,
    algorithms: list[str],
    audience: str | None = None,
    issuer: str | None = None,
    clinic_claim: str = "clinic_id",
    actor_claim: str = "sub",
    role_claim: str = "role",
    leeway: float = 0.0,
) -> Resolver:
    """The clinic, actor and role from the claims of a verified `Authorization: Bearer` JWT (PyJWT:
    signature, `exp`, and `aud`/`iss` when given). No header: no context; a token that fails
    verification: `InvalidCredentials` (401). Needs PyJWT, checked here, not per request."""
    try:
        import jwt
    except ImportError:
        raise ConfigError("from_jwt", "needs PyJWT: pip install pyjwt") from None
    if not algorithms:
        raise ConfigError("from_jwt", "name the accepted algorithms")
    options: dict[str, Any] = {
        "algorithms": list(algorithms), "audience": audience, "issuer": issuer,
        "leeway": leeway, "options": {"require": ["exp"]},
    }
    return _JwtResolver(jwt, key, options, (clinic_claim, actor_claim, role_claim))


@dataclass
class _Process:
    """The Database of one process, and the readiness probe's connections to its primary."""

    pid: int
    db: Database
    opened: bool = False
    probes: ProbePool | None = None


# Status of each hcrepo error; the most specific class in an error's MRO decides.
_STATUS: dict[type[BaseException], int] = {
    # No clinic: nothing identifies the caller as a tenant, so it must authenticate (401).
    TenantContextMissing: 401,
    InvalidCredentials: 401,
    # A clinic but no actor: the caller is known, and a clinic-level identity may not write;
    # authenticating again as the same principal would not help (403).
    ActorRequired: 403,
    RowSecurityViolation: 403,
    NotFound: 404,
    UniqueViolation: 409,
    ExclusionViolation: 409,
    CheckViolation: 409,
    ForeignKeyViolation: 409,
    InvalidContext: 400,
    InvalidOrderBy: 400,
    PageSizeExceeded: 400,
    # Overload (the pool, or HCREPO_POOL_MAX_WAITING callers already waiting) and an
    # unreachable primary are passing: 503 with Retry-After. No 429: hcrepo has no rate limit.
    PoolTimeout: 503,
    ConnectionLost: 503,
    SerializationFailure: 503,
    CommitOutcomeUnknown: 500,
    HcrepoError: 500,
}


def error_status(error: BaseException) -> int:
    """The HTTP status of an hcrepo error. A data exception (SQLSTATE class 22: a value the
    column cannot hold) is the request's fault: 400."""
    if isinstance(error, DatabaseError) and (error.sqlstate or "").startswith("22"):
        return 400
    for cls in type(error).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            return status
    return 500


def raised_by_hcrepo(error: BaseException) -> bool:
    """Whether hcrepo raised `error` itself (a repository call's bad arguments), not code it
    called back: its innermost frame is hcrepo's public boundary."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR)


_instances: weakref.WeakSet[HcRepo] = weakref.WeakSet()


class HcRepo:
    """The extension. `database` makes the process's (unopened) Database; by default
    `Database(settings)` when `settings` is given, else `Database.from_env()`.

    Paths may be None to leave an endpoint out. The token travels in the cookie
    `token_cookie` and the header `token_header` (either may be None); a malformed token is
    ignored: it cannot have come from here, and reading without it only drops a wait.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        database: Callable[[], Database] | None = None,
        settings: Settings | None = None,
        resolver: Resolver | None = None,
        health_path: str | None = "/healthz",
        ready_path: str | None = "/readyz",
        metrics_path: str | None = "/metrics",
        ready_timeout: float | None = None,
        token_cookie: str | None = "hcrepo_rw",
        token_header: str | None = "X-Hcrepo-Token",
        token_max_age: int = 60,
        cookie_secure: bool = True,
    ) -> None:
        if database is None:
            database = Database.from_env if settings is None else lambda: Database(settings)
        self._factory: Callable[[], Database] = database
        self.resolver = resolver or from_g()
        self._paths = {"healthz": health_path, "readyz": ready_path, "metrics": metrics_path}
        self._ready_timeout = ready_timeout
        self._cookie, self._header = token_cookie, token_header
        self._max_age, self._secure = token_max_age, cookie_secure
        self._state: _Process | None = None
        # A parent's Database, in a forked child: kept referenced so that no finalizer ends
        # the parent's sessions from here (hcrepo's fork hooks already dropped its pools).
        self._inherited: list[_Process] = []
        self._lock = threading.Lock()
        self._own: set[str] = set()
        _instances.add(self)
        if app is not None:
            self.init_app(app)

    # -- the process's Database ---------------------------------------------------------

    @property
    def db(self) -> Database:
        """This process's Database, opened on first use."""
        state = self._state
        if state is not None and state.opened and state.pid == os.getpid():
            return state.db
        return self._process(open_db=True).db

    def _process(self, *, open_db: bool) -> _Process:
        """This process's state, made on first use (after a fork: anew)."""
        with self._lock:
            pid = os.getpid()
            state = self._state
            if state is None or state.pid != pid:
                if state is not None:
                    self._inherited.append(state)
                state = self._state = _Process(pid, self._factory())
                atexit.register(self.close)
            if open_db and not state.opened:
                # A failure (PoolTimeout: the primary did not answer) leaves it closed: the
                # next request tries again.
                state.db.open()
                state.opened = True
            return state

    def close(self) -> None:
        """Close this process's Database (atexit does it too); a later use opens a new one.
        A Database inherited from a parent process is left alone."""
        with self._lock:
            state, self._state = self._state, None
            atexit.unregister(self.close)
        if state is None or state.pid != os.getpid():
            return
        if state.probes is not None:
            state.probes.close()
        state.db.close()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork

    # -- wiring ---------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        app.extensions[_EXTENSION] = self
        views: dict[str, Callable[[], ResponseReturnValue]] = {
            "healthz": _healthz, "readyz": self._readyz, "metrics": self._metrics,
        }
        for name, path in self._paths.items():
            if path is not None:
                endpoint = f"{_EXTENSION}_{name}"
                app.add_url_rule(path, endpoint=endpoint, view_func=views[name],
                                 methods=["GET"])
                self._own.add(endpoint)
        app.register_error_handler(HcrepoError, self._error_response)
        app.register_error_handler(TypeError, self._type_error_response)
        app.after_request(self._send_token)
        # An instance attribute shadows the method: the view runs inside this wrapper's block.
        app.dispatch_request = self._dispatcher(app.dispatch_request)  # type: ignore[method-assign]

    def _dispatcher(
        self, dispatch: Callable[[], ResponseReturnValue]
    ) -> Callable[[], ResponseReturnValue]:
        def dispatch_request() -> ResponseReturnValue:
            if request.routing_exception is not None or request.endpoint in self._own:
                return dispatch()  # an unknown URL, or no query: no Database, no resolver
            db = self.db
            found = self.resolver(request)
            after = self._carried(db)
            # No result: explicitly no clinic and no actor, whatever encloses the app.
            clinic_id, actor_id, role = ((None, None, None) if found is None else
                                         (found.clinic_id, found.actor_id, found.role))
            with db.context(clinic_id=clinic_id, actor_id=actor_id, role=role):
                try:
                    if after is None:
                        return dispatch()
                    with after:
                        return dispatch()
                finally:
                    # Outside the read_after block: only this request's own commits count.
                    written = db.last_write_token()
                    if written is not None:
                        setattr(g, _WRITTEN, written)

        return dispatch_request

    def _carried(self, db: Database) -> Block | None:
        """The read-after block of the token the request carried (None: none, or malformed)."""
        token = request.headers.get(self._header) if self._header else None
        if not token and self._cookie:
            token = request.cookies.get(self._cookie)
        if not token:
            return None
        try:
            return db.read_after(token)
        except InvalidToken:
            return None

    def _send_token(self, response: Response) -> Response:
        token = g.pop(_WRITTEN, None)
        if token is not None:
            if self._cookie:
                response.set_cookie(self._cookie, token, max_age=self._max_age,
                                    secure=self._secure, httponly=True, samesite="Lax")
            if self._header:
                response.headers[self._header] = token
        return response

    # -- errors ---------------------------------------------------------------------------

    def _error_response(self, error: HcrepoError) -> Response:
        status = error_status(error)
        response = jsonify(error=type(error).__name__, message=str(error))
        response.status_code = status
        if status == 401:
            challenge = getattr(self.resolver, "challenge", None)
            if challenge:
                response.headers["WWW-Authenticate"] = challenge
        elif status == 503:
            response.headers["Retry-After"] = str(self._retry_after())
        if status >= 500:
            rule = request.url_rule.rule if request.url_rule else "(no route)"
            current_app.logger.error("hcrepo: %s in %s %s", type(error).__name__,
                                     request.method, rule, exc_info=status == 500)
        return response

    def _type_error_response(self, error: TypeError) -> Response:
        if not raised_by_hcrepo(error):
            raise error  # the application's own bug: Flask's usual 500, logged
        response = jsonify(error=type(error).__name__, message=str(error))
        response.status_code = 400
        return response

    def _retry_after(self) -> int:
        # A breaker's reset: when its trial may next let calls through to the server.
        state = self._state
        reset = state.db.settings.breaker_reset if state is not None else 1.0
        return max(1, math.ceil(reset))

    # -- health endpoints ---------------------------------------------------------------

    def _readyz(self) -> ResponseReturnValue:
        """Ready when the primary answers `SELECT 1` within the timeout (HCREPO_HEALTH_TIMEOUT
        by default), on connections of its own: a busy application pool is not unreadiness."""
        probes = self._probes()
        try:
            with probes.connection() as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, OSError, ProbeBusy) as exc:
            headers = {"Retry-After": str(self._retry_after())}
            return {"status": "unavailable", "error": describe_error(exc)}, 503, headers
        return {"status": "ready"}

    def _probes(self) -> ProbePool:
        # Not opened for this: a primary that is down must not hold the probe for the pool's
        # acquire timeout.
        state = self._process(open_db=False)
        with self._lock:
            if state.probes is None:
                settings = state.db.settings
                state.probes = ProbePool(settings.database_url,
                                         self._ready_timeout or settings.health_timeout,
                                         warm_up="SELECT 1")
            return state.probes

    def _metrics(self) -> ResponseReturnValue:
        return Response(self.db.metrics(), content_type=CONTENT_TYPE_LATEST)


def _healthz() -> ResponseReturnValue:
    """Liveness: the process answers; no query."""
    return {"status": "ok"}


def current_db() -> Database:
    """The Database of the current app's HcRepo (for blueprints that do not hold it)."""
    extension: HcRepo = current_app.extensions[_EXTENSION]
    return extension.db


def _reset_after_fork() -> None:
    for instance in list(_instances):
        instance._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
