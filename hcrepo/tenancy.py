"""The ambient clinic, actor and staff role, scoped to the `with` block that set them.

A context is in force for the code that its `with db.context(...)` block runs, on the thread
running it, and nowhere else. It is found by walking the caller's stack to the nearest frame
that opened a block. contextvars cannot give that guarantee: a generator suspended inside its
own block leaves a contextvar set for whoever consumes it, a thread-pool worker keeps it for
its next task, and a WSGI thread for its next request. With the stack as the carrier:

- a generator's block applies while the generator runs (inside its consumer's own block, the
  generator's code still runs as the generator's context) and not while it is suspended;
- a `@contextmanager` helper that wraps `db.context` gives the context to its `with` body, as
  `ExitStack.enter_context` does: context-manager plumbing in `contextlib` is looked through;
- another thread gets a context only through `bind_context`, which captures the block's scope.

A block entered by hand and never left (`__enter__` without `__exit__`) stops applying when
its frame returns, but its registration, and so that frame, stays until the process ends:
leave blocks with `with`. A generator dropped inside its block leaves when it is collected.

A block's scope also carries what travels with the request: its read-your-writes positions
(shared by the blocks nested in it and the workers bound to it, dropped when the outermost
block ends), the positions it was told to wait for, and the unit of work open in it.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar
from uuid import UUID

from hcrepo.errors import InvalidContext

P = ParamSpec("P")
R = TypeVar("R")


# The staff roles a context may claim (migrations/0002, clinic_memberships.role). Auditors
# are not among them: cross-clinic audit reads log in as the database role hcrepo_auditor,
# they are not a role a clinic's member claims on the application's connection.
STAFF_ROLES = frozenset({"doctor", "nurse", "admin", "receptionist"})
# Who may break the glass: the clinicians (the database checks it again, migrations/0007).
EMERGENCY_ROLES = frozenset({"doctor", "nurse"})


@dataclass(frozen=True, slots=True)
class Context:
    """Who is acting (actor, in which staff role) for which tenant (clinic); any may be
    absent. No role claimed: the database applies the actor's membership role.

    `emergency_reason` is a break-glass in force; `emergency_access_id` the row that
    recorded it (audit.emergency_access), without which the database ignores the reason.
    """

    clinic_id: UUID | None = None
    actor_id: UUID | None = None
    role: str | None = None
    emergency_reason: str | None = None
    emergency_access_id: UUID | None = None
    # Every transaction sends these, so they are rendered once, when the context is made.
    settings: tuple[str, str, str, str, str] = field(init=False, repr=False, compare=False)
    """The values of `app.clinic_id`, `app.actor_id`, `app.role`, `app.emergency_reason`,
    `app.emergency_access_id`; '' means none (RLS fails closed)."""

    def __post_init__(self) -> None:
        rendered = (_as_setting(self.clinic_id), _as_setting(self.actor_id),
                    self.role or "", self.emergency_reason or "",
                    _as_setting(self.emergency_access_id))
        object.__setattr__(self, "settings", rendered)

    def policy_value(self, name: str) -> object:
        """The value a cache key holds for the policy input `name`. With no role claimed the
        database derives the role from the actor's membership, so the actor stands in for
        it: `independent_of=("actor_id",)` then still keeps members of different roles apart.
        """
        if name == "role" and self.role is None:
            return self.actor_id
        return getattr(self, name)

    @property
    def who(self) -> tuple[UUID | None, UUID | None, str | None]:
        """Clinic, actor and claimed role: what a recorded emergency access is bound to."""
        return self.clinic_id, self.actor_id, self.role


def _as_setting(value: UUID | None) -> str:
    return "" if value is None else str(value)


# The Context fields every transaction sends to PostgreSQL as `app.<name>` that row-level
# security reads, so every cached result is keyed by each of them unless its query declares
# it does not depend on one (`@cached(independent_of=...)`). The emergency reason is not
# among them: the policies accept a break-glass by its recorded row, whose id is unique to
# one use, so a break-glass read never shares a cache entry with any other read.
POLICY_INPUTS = ("clinic_id", "actor_id", "role", "emergency_access_id")
# What a query may declare its result independent of (the rest is always keyed).
SHAREABLE_INPUTS = ("actor_id", "role")

@dataclass(frozen=True, slots=True)
class EmergencyAccess:
    """One recorded break-glass, as the alert hook receives it: who, in which staff role (the
    one in force, claimed or the membership's), where, why; no PHI."""

    access_id: UUID
    clinic_id: UUID
    actor_id: UUID
    role: str
    reason: str

    def __repr__(self) -> str:
        # The reason is free text a clinician typed: it stays out of printed frames and logs.
        return f"EmergencyAccess(access_id={self.access_id}, <reason withheld>)"


# Records a break-glass on the primary before the block runs (Database does it: this layer
# has no connections) and returns the recorded row's id; the positions are the block's, so
# its reads wait for the record where a replica answers.
Recorder = Callable[["Context", "Positions"], UUID]

EMPTY = Context()
UNSET: Any = object()  # "not given": None means "no clinic"


class Positions:
    """Read-your-writes positions of one block (cluster -> LSN), shared with the blocks nested
    in it and the workers bound to it. Recording takes a lock; reading does not."""

    __slots__ = ("_lock", "_lsns")

    def __init__(self) -> None:
        self._lsns: Mapping[str, int] = MappingProxyType({})
        self._lock = threading.Lock()

    def get(self, cluster: str) -> int:
        return self._lsns.get(cluster, 0)

    def record(self, cluster: str, lsn: int) -> None:
        with self._lock:
            if self._lsns.get(cluster, 0) < lsn:
                self._lsns = MappingProxyType({**self._lsns, cluster: lsn})


class _Nowhere(Positions):
    """Outside every block: a position recorded there belongs to nobody, so it is dropped."""

    __slots__ = ()

    def record(self, cluster: str, lsn: int) -> None:
        return None


class OpenUnit(Protocol):
    """What a scope needs of the unit of work open in it."""

    @property
    def is_open(self) -> bool: ...


NO_POSITIONS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Scope:
    """What is in force for the code one block runs."""

    context: Context
    writes: Positions
    awaited: Mapping[str, int] = field(default_factory=lambda: NO_POSITIONS)
    unit: OpenUnit | None = None

    def required(self, cluster: str) -> int:
        """The LSN this scope's reads must see on `cluster` (0: any replica will do)."""
        return max(self.writes.get(cluster), self.awaited.get(cluster, 0))

    def open_unit(self) -> OpenUnit | None:
        unit = self.unit
        return unit if unit is not None and unit.is_open else None


ROOT = Scope(EMPTY, _Nowhere())

# The scopes opened by each frame that is inside a block, innermost last. Frames are never
# shared by two running threads, so each list is only ever changed by one thread at a time.
_scopes: dict[FrameType, list[Scope]] = {}
_CONTEXTLIB = contextlib.__file__


def scope() -> Scope:
    """The scope of the caller: the innermost block open on its stack (ROOT when none)."""
    if not _scopes:
        return ROOT
    return _lookup(sys._getframe(1))


def _lookup(frame: FrameType | None) -> Scope:
    while frame is not None:
        held = _scopes.get(frame)
        if held:
            return held[-1]
        frame = frame.f_back
    return ROOT


def _owner(frame: FrameType) -> FrameType:
    """The frame whose code a block opened from `frame` covers: context-manager plumbing of
    `contextlib` (ExitStack, the generator of a `@contextmanager`) is looked through."""
    while True:
        code = frame.f_code
        back = frame.f_back
        if back is None:
            return frame
        if code.co_filename == _CONTEXTLIB or (
            code.co_flags & inspect.CO_GENERATOR and back.f_code.co_filename == _CONTEXTLIB
        ):
            frame = back
            continue
        return frame


class Block:
    """A `with` block that puts a scope in force; `derive` makes it from the outer scope.

    `enter` takes the frame the block belongs to (the caller of `__enter__` by default);
    entering the same block object twice is refused, as for any context manager here.
    """

    __slots__ = ("_derive", "_frame", "scope")

    def __init__(self, derive: Callable[[Scope], Scope]) -> None:
        self._derive = derive
        self._frame: FrameType | None = None
        self.scope: Scope = ROOT

    def __enter__(self) -> Scope:
        return self.enter(sys._getframe(1))

    def enter(self, frame: FrameType) -> Scope:
        if self._frame is not None:
            raise RuntimeError("a context block is entered once")
        owner = _owner(frame)
        self.scope = self._derive(_lookup(owner))
        _scopes.setdefault(owner, []).append(self.scope)
        self._frame = owner
        return self.scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exit()

    def exit(self) -> None:
        frame, self._frame = self._frame, None
        if frame is not None:
            _unregister(frame, self.scope)


def _unregister(frame: FrameType, scope: Scope) -> None:
    held = _scopes.get(frame)
    if held is None:
        return
    for index in range(len(held) - 1, -1, -1):
        if held[index] is scope:
            del held[index]
            break
    if not held:
        _scopes.pop(frame, None)


class ContextBlock:
    """`with db.context(...) as context:` — the context made ambient for the block.

    A block given an `emergency_reason` records the break-glass through `recorder` when it is
    entered, and carries the recorded row's id; one without a recorder refuses it.
    """

    __slots__ = ("_block", "_given", "_recorder")

    def __init__(
        self,
        clinic_id: object = UNSET,
        actor_id: object = UNSET,
        role: object = UNSET,
        emergency_reason: object = UNSET,
        recorder: Recorder | None = None,
    ) -> None:
        # Checked now: a bad value is refused where it is written, not where it is used.
        self._given = _checked(clinic_id, actor_id, role, emergency_reason)
        self._recorder = recorder
        self._block = Block(self._derive)

    def _derive(self, outer: Scope) -> Scope:
        writes = Positions() if isinstance(outer.writes, _Nowhere) else outer.writes
        context = _combine(outer.context, self._given, self._recorder, writes)
        return replace(outer, context=context, writes=writes)

    def __enter__(self) -> Context:
        return self._block.enter(sys._getframe(1)).context

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._block.exit()


def use(
    clinic_id: object = UNSET,
    actor_id: object = UNSET,
    role: object = UNSET,
    emergency_reason: object = UNSET,
    recorder: Recorder | None = None,
) -> ContextBlock:
    """Make a context ambient for the block; fields not given are inherited from the outer one."""
    return ContextBlock(clinic_id, actor_id, role, emergency_reason, recorder)


def resolve(
    clinic_id: object = UNSET,
    actor_id: object = UNSET,
    role: object = UNSET,
    emergency_reason: object = UNSET,
    recorder: Recorder | None = None,
) -> Context:
    """The caller's ambient context with explicit arguments taking precedence (a break-glass
    given here is recorded, in the caller's block, as when a block is entered)."""
    outer = _lookup(sys._getframe(1)) if _scopes else ROOT
    given = _checked(clinic_id, actor_id, role, emergency_reason)
    if not given:
        return outer.context
    return _combine(outer.context, given, recorder, outer.writes)


def _checked(clinic_id: object, actor_id: object, role: object,
             emergency_reason: object) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if clinic_id is not UNSET:
        given["clinic_id"] = _as_uuid(clinic_id, "clinic_id")
    if actor_id is not UNSET:
        given["actor_id"] = _as_uuid(actor_id, "actor_id")
    if role is not UNSET:
        if role is not None and not (isinstance(role, str) and role in STAFF_ROLES):
            raise InvalidContext(f"role must be one of {', '.join(sorted(STAFF_ROLES))} "
                                 "or None")
        given["role"] = role
    if emergency_reason is None:  # explicitly none: an inherited break-glass ends here
        given["emergency_reason"] = given["emergency_access_id"] = None
    elif emergency_reason is not UNSET:
        # Only the shape is named: the reason is free text a clinician typed (invariant 7).
        if not isinstance(emergency_reason, str) or not emergency_reason.strip():
            raise InvalidContext("emergency_reason must say why: a non-blank string")
        given["emergency_reason"] = emergency_reason.strip()
        if given.get("role") is not None:
            _check_emergency_role(given["role"])
    return given


def _check_emergency_role(role: str | None) -> None:
    if role is not None and role not in EMERGENCY_ROLES:
        raise InvalidContext("emergency access is for clinicians: role must be one of "
                             f"{', '.join(sorted(EMERGENCY_ROLES))}")


def _combine(outer: Context, given: Mapping[str, Any], recorder: Recorder | None,
             writes: Positions) -> Context:
    """`outer` with the fields `given`. An emergency stays in force only for the clinic,
    actor and role it was recorded for; a new reason is recorded now."""
    context = replace(outer, **given)
    if given.get("emergency_reason") is None:
        if context.who != outer.who:
            context = replace(context, emergency_reason=None, emergency_access_id=None)
        return context
    _check_emergency_role(context.role)  # an inherited role too
    if context.clinic_id is None or context.actor_id is None:
        raise InvalidContext("emergency access needs a clinic_id and an actor_id")
    if recorder is None:
        raise InvalidContext("emergency access is entered through db.context(...), "
                             "which records it")
    context = replace(context, emergency_access_id=None)
    return replace(context, emergency_access_id=recorder(context, writes))


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Carry the caller's scope (clinic, actor, role, read-your-writes, open unit) to another
    thread.

    The scope is captured now: a later change in the caller does not reach the bound call,
    and a write made by the bound call is seen by the block that bound it.
    """
    captured = _lookup(sys._getframe(1)) if _scopes else ROOT

    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        frame = sys._getframe()
        _scopes.setdefault(frame, []).append(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            _unregister(frame, captured)

    return bound


def _as_uuid(value: object, name: str) -> UUID | None:
    if value is None or isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidContext(f"{name} must be a UUID or None")
