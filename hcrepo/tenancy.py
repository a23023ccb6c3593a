"""The ambient clinic and actor of the current request, carried by `contextvars`.

Each context is immutable; nesting replaces the whole value and restores the outer one on exit,
so threads and generators see exactly the context that was current where they were started
(hand work to another thread with `bind_context`, which copies it explicitly).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from hcrepo.errors import InvalidContext

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Context:
    """Who is acting (actor) for which tenant (clinic); either may be absent."""

    clinic_id: UUID | None = None
    actor_id: UUID | None = None
    # Every transaction sends these; rendering two UUIDs costs about 2 µs, so it is done once,
    # when the context is made, not per transaction.
    settings: tuple[str, str] = field(init=False, repr=False, compare=False)
    """The values of `app.clinic_id` / `app.actor_id`; '' means none (RLS fails closed)."""

    def __post_init__(self) -> None:
        rendered = (_as_setting(self.clinic_id), _as_setting(self.actor_id))
        object.__setattr__(self, "settings", rendered)


def _as_setting(value: UUID | None) -> str:
    return "" if value is None else str(value)


# The Context fields every transaction sends to PostgreSQL as `app.<name>`: what row-level
# security may read, so every cached result is keyed by each of them unless its query
# declares it does not depend on one (`@cached(independent_of=...)`).
POLICY_INPUTS = ("clinic_id", "actor_id")

EMPTY = Context()
_current: contextvars.ContextVar[Context] = contextvars.ContextVar("hcrepo_context", default=EMPTY)

UNSET: Any = object()  # "not given": None means "no clinic"


def current() -> Context:
    return _current.get()


def resolve(clinic_id: object = UNSET, actor_id: object = UNSET) -> Context:
    """The ambient context with explicit arguments taking precedence."""
    ambient = _current.get()
    if clinic_id is UNSET and actor_id is UNSET:
        return ambient
    return Context(
        ambient.clinic_id if clinic_id is UNSET else _as_uuid(clinic_id, "clinic_id"),
        ambient.actor_id if actor_id is UNSET else _as_uuid(actor_id, "actor_id"),
    )


@contextmanager
def use(clinic_id: object = UNSET, actor_id: object = UNSET) -> Iterator[Context]:
    """Make a context ambient for the block; fields not given are inherited from the outer one."""
    context = resolve(clinic_id, actor_id)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Capture the caller's contextvars (clinic, actor, read-your-writes) for another thread."""
    captured = contextvars.copy_context()

    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

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
