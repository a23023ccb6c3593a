"""The plan of one repository method: what every runner, the cache and the observer need to
execute it, built once when the repository class is defined (see hcrepo.repository).

A plan binds keyword arguments to the query's `$n` order, converts them to the declared types
where keys and tags are made from them, refuses what the database would refuse or hide, and
formats cache tags. It imports the query declaration layer only (sqlfile, results, tenancy).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, NamedTuple

from pydantic import ConfigDict, TypeAdapter, ValidationError

from hcrepo import sqlfile
from hcrepo.errors import (
    ActorRequired,
    InvalidOrderBy,
    PageSizeExceeded,
    TenantContextMissing,
)
from hcrepo.phi.patients import PatientIds
from hcrepo.results import Shape
from hcrepo.tenancy import Context

DEFAULT_MAX_PAGE = 1000
PAGE_PARAM = "limit"


class CacheSpec(NamedTuple):
    """What `@cached` declared: a TTL (seconds or a preset name), tag templates, and the
    policy inputs (`tenancy.POLICY_INPUTS`) its result does not depend on."""

    ttl: int | str
    tags: tuple[str, ...]
    independent_of: tuple[str, ...] = ()


class QuerySpec(NamedTuple):
    name: str
    phi: bool
    invalidates: tuple[str, ...]
    # Where the access log finds patient ids beyond the defaults (see phi.patients).
    patient_id_field: str | None = None
    patient_id_param: str | None = None


class Arguments:
    """Converts bound arguments to the method's declared parameter types (pydantic, lax), so
    every spelling of a value (a UUID as upper-case, braced or plain text) is sent, hashed
    into cache keys and formatted into tags alike."""

    __slots__ = ("_adapter", "_method", "_names", "_types")

    def __init__(self, method: str, names: Sequence[str], annotations: Sequence[Any]) -> None:
        self._method = method
        self._names = tuple(names)
        self._types = tuple(annotations)
        shape: Any = tuple.__class_getitem__(self._types)
        self._adapter: TypeAdapter[tuple[Any, ...]] = TypeAdapter(
            shape, config=ConfigDict(arbitrary_types_allowed=True)
        )

    def __call__(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            return self._adapter.validate_python(args)
        except ValidationError as exc:
            # pydantic's messages may quote the input: name the parameter and its type only.
            index = next((error["loc"][0] for error in exc.errors(include_input=False)
                          if error["loc"] and isinstance(error["loc"][0], int)), 0)
            raise TypeError(
                f"{self._method}() argument {self._names[index]!r} is not a valid "
                f"{type_name(self._types[index])}"
            ) from None


class Plan:
    """Everything a runner needs to execute one repository method, built once per class."""

    __slots__ = (
        "arguments", "cache", "defaults", "invalidates", "is_write", "max_page", "method",
        "name", "order", "page_index", "param_names", "patients", "phi", "query", "shape", "source",
        "sql", "tenant_scoped",
    )

    def __init__(
        self,
        *,
        query: sqlfile.SqlQuery,
        method: str,
        shape: Shape,
        spec: QuerySpec,
        cache: CacheSpec | None,
        defaults: dict[str, Any],
        tenant_scoped: bool,
        arguments: Arguments | None = None,
        patients: PatientIds | None = None,
    ) -> None:
        self.query = query
        self.name = query.name
        self.source = query.source
        self.sql = query.sql
        self.method = method
        self.shape = shape
        self.is_write = query.is_write
        self.phi = spec.phi
        # Set exactly for `phi=True` queries: what the access log records of each call.
        self.patients = patients
        self.invalidates = spec.invalidates
        self.cache = cache
        self.defaults = defaults
        self.tenant_scoped = tenant_scoped
        self.param_names = query.params
        self.order = query.order_by.param if query.order_by else None
        self.page_index = query.params.index(PAGE_PARAM) if PAGE_PARAM in query.params else None
        self.max_page = query.max_page or DEFAULT_MAX_PAGE
        # Only cached and invalidating plans convert: the others send what they are given.
        self.arguments = arguments

    def bind(self, kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
        """Arguments in `$n` order and the statement text (the chosen ORDER BY variant).

        A cached or invalidating plan returns the arguments converted to the declared
        parameter types (`TypeError` naming the parameter when one does not convert)."""
        if self.defaults:
            kwargs = {**self.defaults, **kwargs}
        try:
            args = tuple([kwargs[name] for name in self.param_names])
        except KeyError as exc:
            raise TypeError(f"{self.method}() missing keyword argument {exc.args[0]!r}") from None
        expected = len(self.param_names) + (self.order is not None)
        if len(kwargs) != expected:
            known = set(self.param_names) | {self.order}
            extra = sorted(set(kwargs) - known)
            raise TypeError(f"{self.method}() got unexpected keyword arguments {extra}")
        if self.page_index is not None:
            size = args[self.page_index]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= self.max_page:
                raise PageSizeExceeded(
                    f"page size must be an integer from 1 to {self.max_page}",
                    query=self.name, source=self.source,
                )
        order = None
        if self.order is not None:
            order = kwargs[self.order]
            if order not in self.query.variants:
                raise InvalidOrderBy(
                    "ORDER BY must be one of "
                    + ", ".join(sorted(self.query.variants)),
                    query=self.name, source=self.source,
                )
        sql = self.query.sql_for(order)
        if self.arguments is not None:
            args = self.arguments(args)
        return args, sql

    def check_context(self, context: Context) -> None:
        """Refuse, before any round trip, what the database would refuse or hide."""
        if self.tenant_scoped and context.clinic_id is None:
            raise TenantContextMissing(
                f"{self.name} ({self.source}) needs a clinic: use db.context(clinic_id=...)"
            )
        if self.is_write and context.actor_id is None:
            raise ActorRequired(
                f"{self.name} ({self.source}) writes and needs an actor: "
                "use db.context(actor_id=...)"
            )

    def tags(self, templates: Sequence[str], args: Sequence[Any]) -> list[str]:
        """`templates` formatted from bound arguments; `TypeError` naming the template (never
        a value) when one cannot be formatted from them."""
        values = dict(zip(self.param_names, args, strict=True))
        tags = []
        for template in templates:
            try:
                tags.append(template.format_map(values))
            except (ValueError, TypeError, KeyError, AttributeError, IndexError):
                raise TypeError(f"{self.method}(): tag {template!r} cannot be formatted from "
                                "its arguments") from None
        return tags

    def invalidation_tags(self, args: Sequence[Any]) -> list[str]:
        """The `invalidates=` tags of a write from its bound arguments. Runners call it before
        sending the write, so a tag that cannot be formatted fails before anything commits."""
        return self.tags(self.invalidates, args) if self.invalidates else []



def type_name(annotation: Any) -> str:
    """A type as a reader writes it: `UUID`, `list[int]`, `str | None`."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("datetime.", "").replace("uuid.", "")
