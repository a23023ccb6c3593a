"""Typed repositories: a Python method signature bound to one named query of a `.sql` file.

`@query` and `@cached` only mark the declared method. When a `Repository` subclass is defined,
each marked method is checked against its SQL (parameters, result shape) and replaced by a
small function that binds the keyword arguments and hands a `Plan` to the runner: a
`Database` (autocommit read or single-statement write) or a `UnitOfWork` (its transaction).
"""

from __future__ import annotations

import inspect
import string
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, ClassVar, NamedTuple, ParamSpec, Protocol, TypeVar
from uuid import UUID

from hcrepo import sqlfile, tenancy
from hcrepo.errors import (
    ActorRequired,
    InvalidContext,
    InvalidOrderBy,
    PageSizeExceeded,
    SqlFileError,
    TenantContextMissing,
    detached,
)
from hcrepo.observer import Observer
from hcrepo.results import Shape, shape_for
from hcrepo.tenancy import Context

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_MAX_PAGE = 1000
PAGE_PARAM = "limit"


class CacheSpec(NamedTuple):
    """What `@cached` declared: a TTL (seconds or a preset name) and tag templates."""

    ttl: int | str
    tags: tuple[str, ...]


class QuerySpec(NamedTuple):
    name: str
    phi: bool
    invalidates: tuple[str, ...]


class Plan:
    """Everything a runner needs to execute one repository method, built once per class."""

    __slots__ = (
        "cache", "defaults", "invalidates", "is_write", "max_page", "method", "name", "order",
        "page_index", "param_names", "phi", "query", "shape", "source", "sql", "tenant_scoped",
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
    ) -> None:
        self.query = query
        self.name = query.name
        self.source = query.source
        self.sql = query.sql
        self.method = method
        self.shape = shape
        self.is_write = query.is_write
        self.phi = spec.phi
        self.invalidates = spec.invalidates
        self.cache = cache
        self.defaults = defaults
        self.tenant_scoped = tenant_scoped
        self.param_names = query.params
        self.order = query.order_by.param if query.order_by else None
        self.page_index = query.params.index(PAGE_PARAM) if PAGE_PARAM in query.params else None
        self.max_page = query.max_page or DEFAULT_MAX_PAGE

    def bind(self, kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
        """Arguments in `$n` order and the statement text (the chosen ORDER BY variant)."""
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
        sql = self.sql
        if self.order is not None:
            choice = kwargs[self.order]
            if choice not in self.query.variants:
                raise InvalidOrderBy(
                    "ORDER BY must be one of "
                    + ", ".join(sorted(self.query.variants)),
                    query=self.name, source=self.source,
                )
            sql = self.query.variants[choice]
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
        values = dict(zip(self.param_names, args, strict=True))
        return [template.format_map(values) for template in templates]


class Runner(Protocol):
    """A `Database` or a `UnitOfWork`: something that can execute a plan."""

    @property
    def observer(self) -> Observer: ...

    @property
    def fixed_context(self) -> Context | None:
        """The context every call runs with regardless of the ambient one (a unit of work's)."""

    def run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any: ...


def query(
    name: str,
    *,
    phi: bool = False,
    invalidates: Sequence[str] = (),
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Bind a repository method to the query `name` of the class's SQL file."""

    def mark(fn: Callable[P, R]) -> Callable[P, R]:
        fn.__hcrepo_query__ = QuerySpec(name, phi, tuple(invalidates))  # type: ignore[attr-defined]
        return fn

    return mark


def cached(
    *, ttl: int | str, tags: Sequence[str] = ()
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Serve the method from Redis (see hcrepo.cache); only valid on read queries."""

    def mark(fn: Callable[P, R]) -> Callable[P, R]:
        fn.__hcrepo_cache__ = CacheSpec(ttl, tuple(tags))  # type: ignore[attr-defined]
        return fn

    return mark


class Repository:
    """Base class: `class Patients(Repository, sql="patients.sql")`; `tenant=False` opts out."""

    __sql_file__: ClassVar[Path]
    __plans__: ClassVar[dict[str, Plan]]
    __tenant_scoped__: ClassVar[bool] = True

    def __init__(
        self,
        runner: Runner,
        *,
        clinic_id: UUID | str | None = tenancy.UNSET,
        actor_id: UUID | str | None = tenancy.UNSET,
    ) -> None:
        """`clinic_id` / `actor_id` given here override the ambient context for every call
        through this instance. A unit of work keeps the clinic and actor it was opened with,
        so an override that differs from them is refused."""
        self._runner = runner
        self._explicit: dict[str, Any] | None = None
        given = {name: value for name, value in (("clinic_id", clinic_id),
                                                 ("actor_id", actor_id))
                 if value is not tenancy.UNSET}
        if not given:
            return
        fixed = runner.fixed_context
        if fixed is None:
            self._explicit = given
            return
        wanted = tenancy.resolve(**given)
        for name in given:
            if getattr(wanted, name) != getattr(fixed, name):
                raise InvalidContext(
                    f"{type(self).__name__}: a unit of work runs with the {name} it was opened "
                    f"with; pass {name} to db.unit_of_work() instead"
                )

    def __init_subclass__(cls, *, sql: str | None = None, tenant: bool = True, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.__tenant_scoped__ = tenant
        if sql is None:
            return
        cls.__sql_file__ = _resolve_sql_path(cls, sql)
        queries = sqlfile.load(cls.__sql_file__)
        cls.__plans__ = {}
        for attribute, fn in list(vars(cls).items()):
            spec: QuerySpec | None = getattr(fn, "__hcrepo_query__", None)
            if spec is None:
                continue
            plan = _plan_for(cls, attribute, fn, spec, queries)
            cls.__plans__[attribute] = plan
            setattr(cls, attribute, _method(plan, fn))


def _resolve_sql_path(cls: type, sql: str) -> Path:
    path = Path(sql)
    if path.is_absolute():
        return path
    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None)
    base = Path(module_file).resolve().parent if module_file else Path.cwd()
    return (base / path).resolve()


def _plan_for(
    cls: type,
    attribute: str,
    fn: Callable[..., Any],
    spec: QuerySpec,
    queries: dict[str, sqlfile.SqlQuery],
) -> Plan:
    method = f"{cls.__name__}.{attribute}"
    code = getattr(fn, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code else method

    sql_file: Path = getattr(cls, "__sql_file__")  # noqa: B009 (set just before, on cls)

    def fail(message: str, q: sqlfile.SqlQuery | None = None) -> SqlFileError:
        path, line = (q.path, q.line) if q else (str(sql_file), 1)
        return SqlFileError(f"{method} ({where}): {message}", path=path, line=line,
                            query=spec.name)

    found = queries.get(spec.name)
    if found is None:
        raise fail(f"no query named {spec.name!r} in {sql_file.name}")
    signature = inspect.signature(fn)
    parameters = list(signature.parameters.values())[1:]
    positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if positional:
        raise fail(f"parameters must be keyword-only (add '*'): {', '.join(positional)}", found)
    declared = {p.name for p in parameters}
    in_sql = set(found.params) | ({found.order_by.param} if found.order_by else set())
    if declared - in_sql:
        raise fail(f"parameters the SQL lacks: {', '.join(sorted(declared - in_sql))}", found)
    if in_sql - declared:
        raise fail(f"SQL parameters the signature lacks: {', '.join(sorted(in_sql - declared))}",
                   found)
    cache: CacheSpec | None = getattr(fn, "__hcrepo_cache__", None)
    if cache is not None and found.is_write:
        raise fail("@cached on a query that writes", found)
    if spec.invalidates and not found.is_write:
        raise fail("invalidates= on a read query", found)
    for template in (*spec.invalidates, *(cache.tags if cache else ())):
        for name in _template_fields(template):
            if name not in found.params:
                raise fail(f"tag {template!r} uses {name!r}, which is not a query parameter",
                           found)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise fail(f"cannot resolve annotations ({exc})", found) from None
    if "return" not in hints:
        raise fail("missing return annotation", found)
    try:
        shape = shape_for(hints["return"], returns_rows=found.returns_rows, where=method)
    except ValueError as exc:
        raise fail(str(exc).removeprefix(f"{method}: "), found) from None
    defaults = {
        p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
    }
    return Plan(query=found, method=method, shape=shape, spec=spec, cache=cache,
                defaults=defaults, tenant_scoped=getattr(cls, "__tenant_scoped__", True))


def _template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _method(plan: Plan, declared: Callable[..., Any]) -> Callable[..., Any]:
    bind = plan.bind
    streams = plan.shape.streams

    def call(self: Repository, kwargs: dict[str, Any]) -> Any:
        args, sql = bind(kwargs)
        runner = self._runner
        started = perf_counter()
        try:
            if self._explicit is None:
                return runner.run(plan, args, sql)
            with tenancy.use(**self._explicit):
                return runner.run(plan, args, sql)
        except BaseException as error:
            runner.observer.failed(plan, error)
            raise
        finally:
            runner.observer.finished(plan, perf_counter() - started)

    def method(self: Repository, **kwargs: Any) -> Any:
        # The public boundary: errors leave without hcrepo's frames (they hold the arguments)
        # or the driver errors they were translated from (see errors.detached).
        try:
            result = call(self, kwargs)
        except Exception as error:
            failure = error
        else:
            return _detaching(result) if streams else result
        raise detached(failure)

    method.__name__ = declared.__name__
    method.__qualname__ = declared.__qualname__
    method.__doc__ = declared.__doc__
    method.__wrapped__ = declared  # type: ignore[attr-defined]
    return method


def _detaching(rows: Iterator[Any]) -> Iterator[Any]:
    """A stream's rows, with errors raised while reading them detached like a call's."""
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as error:
                failure = error
            else:
                yield row
                continue
            raise detached(failure)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # dropped early: the cursor is cleaned up now, not when collected
