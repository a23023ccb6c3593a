"""Typed repositories: a Python method signature bound to one named query of a `.sql` file.

`@query` and `@cached` only mark the declared method. When a `Repository` subclass is defined,
each marked method is checked against its SQL (parameters, result shape) and replaced by a
small function that binds the keyword arguments and hands a `Plan` to the runner: a
`Database` (autocommit read or single-statement write) or a `UnitOfWork` (its transaction).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import inspect
import re
import string
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, ClassVar, ParamSpec, Protocol, TypeVar
from uuid import UUID

from pydantic import PydanticUserError

from hcrepo import sqlfile, tenancy
from hcrepo.crypto.keyring import Keyring
from hcrepo.errors import (
    InvalidContext,
    SqlFileError,
    detached,
)
from hcrepo.observer import Observer
from hcrepo.phi import patients as patient_ids
from hcrepo.phi.fields import encrypted_fields
from hcrepo.plan import Arguments, CacheSpec, Plan, QuerySpec, type_name
from hcrepo.results import Many, Shape, shape_for
from hcrepo.sealing import FieldCipher
from hcrepo.tenancy import Context

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Runner(Protocol):
    """A `Database` or a `UnitOfWork`: something that can execute a plan."""

    @property
    def observer(self) -> Observer: ...

    @property
    def fixed_context(self) -> Context | None:
        """The context every call runs with regardless of the ambient one (a unit of work's)."""

    @property
    def keyring(self) -> Keyring:
        """Data keys and the blind index, for methods with encrypted columns."""

    def run(self, plan: Plan, args: tuple[Any, ...], sql: str) -> Any: ...


def query(
    name: str,
    *,
    phi: bool = False,
    invalidates: Sequence[str] = (),
    patient_id_field: str | None = None,
    patient_id_param: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Bind a repository method to the query `name` of the class's SQL file.

    `phi=True`: every call is recorded in the PHI access log, with the ids of the patients
    it shows: each row's field marked `PatientId()` or named `patient_id`, or the field
    `patient_id_field` names; and the argument `patient_id`, or the one `patient_id_param`
    names (a call about one patient that returns a rowcount, say).
    """

    def mark(fn: Callable[P, R]) -> Callable[P, R]:
        spec = QuerySpec(name, phi, tuple(invalidates), patient_id_field, patient_id_param)
        fn.__hcrepo_query__ = spec  # type: ignore[attr-defined]
        return fn

    return mark


def cached(
    *, ttl: int | str, tags: Sequence[str] = (), independent_of: Sequence[str] = ()
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Serve the method from Redis (see hcrepo.cache); only valid on read queries.

    Entries are keyed by every policy input (`tenancy.POLICY_INPUTS`: the clinic, the
    actor, the staff role, a break-glass) the database sees; `independent_of=("actor_id",)`
    shares them among a clinic's actors claiming one role, for a query whose result
    row-level security does not shape by actor (`"role"`: among its roles too).
    """

    def mark(fn: Callable[P, R]) -> Callable[P, R]:
        spec = CacheSpec(ttl, tuple(tags), tuple(independent_of))
        fn.__hcrepo_cache__ = spec  # type: ignore[attr-defined]
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
        role: str | None = tenancy.UNSET,
    ) -> None:
        """`clinic_id` / `actor_id` / `role` given here override the ambient context for every
        call through this instance. A unit of work keeps the context it was opened with, so
        an override that differs from it is refused. (A break-glass is entered only through
        `db.context(emergency_reason=...)`, which records it.)"""
        self._runner = runner
        self._explicit: dict[str, Any] | None = None
        given = {name: value for name, value in (("clinic_id", clinic_id),
                                                 ("actor_id", actor_id), ("role", role))
                 if value is not tenancy.UNSET}
        if not given:
            return
        # Checks the values now, whatever the runner.
        wanted = tenancy.resolve(given.get("clinic_id", tenancy.UNSET),
                                 given.get("actor_id", tenancy.UNSET),
                                 given.get("role", tenancy.UNSET))
        fixed = runner.fixed_context
        if fixed is None:
            self._explicit = given
            return
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
            plan, cipher = _plan_for(cls, attribute, fn, spec, queries)
            cls.__plans__[attribute] = plan
            setattr(cls, attribute, _method(plan, fn, cipher))


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
) -> tuple[Plan, FieldCipher | None]:
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
    _check_signature(method, found, parameters, getattr(cls, "__tenant_scoped__", True),
                     lambda message: fail(message, found))
    cache: CacheSpec | None = getattr(fn, "__hcrepo_cache__", None)
    if cache is not None and found.is_write:
        raise fail("@cached on a query that writes", found)
    if spec.invalidates and not found.is_write:
        raise fail("invalidates= on a read query", found)
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
    cipher = _cipher_for(method, found, shape, lambda message: fail(message, found))
    arguments = None
    if cache is not None or spec.invalidates:
        arguments = _cache_contract(method, found, spec, cache, hints,
                                    lambda message: fail(message, found))
    defaults = {
        p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
    }
    tenant_scoped = getattr(cls, "__tenant_scoped__", True)
    patients = _patients_for(spec, found, shape, tenant_scoped,
                             lambda message: fail(message, found))
    plan = Plan(query=found, method=method, shape=shape, spec=spec, cache=cache,
                defaults=defaults, tenant_scoped=tenant_scoped, arguments=arguments,
                patients=patients)
    return plan, cipher


def _check_signature(
    method: str, found: sqlfile.SqlQuery, parameters: list[inspect.Parameter],
    tenant_scoped: bool, fail: Callable[[str], SqlFileError],
) -> None:
    """The method's keyword-only parameters are the SQL's, those an encrypted column or a
    blind index takes in their place included."""
    positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if positional:
        raise fail(f"parameters must be keyword-only (add '*'): {', '.join(positional)}")
    fields = bool(found.encrypted or found.generated)
    if fields and not tenant_scoped:
        raise fail("encrypted columns need a tenant-scoped repository (data keys are per "
                   "clinic)")
    params = FieldCipher(method, found, None).signature(found.params) if fields else set(
        found.params)
    in_sql = params | ({found.order_by.param} if found.order_by else set())
    declared = {p.name for p in parameters}
    if declared - in_sql:
        raise fail(f"parameters the SQL lacks: {', '.join(sorted(declared - in_sql))}")
    if in_sql - declared:
        raise fail(f"SQL parameters the signature lacks: {', '.join(sorted(in_sql - declared))}")


def _cipher_for(
    method: str, found: sqlfile.SqlQuery, shape: Shape, fail: Callable[[str], SqlFileError]
) -> FieldCipher | None:
    """How the method seals its arguments and opens its rows; None when it has no encrypted
    column, generated id or blind index."""
    fields = bool(found.encrypted or found.generated)
    row = shape.row.target if shape.row is not None and shape.row.is_model else None
    # A model field declared encrypted, read by a query without the directive, would be
    # handed out as ciphertext: refused here as much as a directive without its model.
    if fields or (row is not None and encrypted_fields(row)):
        problems = FieldCipher.problems(found, row)
        if problems:
            raise fail("; ".join(problems))
    return FieldCipher(method, found, row) if fields else None


def _patients_for(
    spec: QuerySpec, found: sqlfile.SqlQuery, shape: Shape, tenant_scoped: bool,
    fail: Callable[[str], SqlFileError],
) -> patient_ids.PatientIds | None:
    """Where the access log finds the patients of a `phi=True` call."""
    if not spec.phi:
        if spec.patient_id_field or spec.patient_id_param:
            raise fail("patient_id_field= and patient_id_param= need phi=True")
        return None
    if not tenant_scoped:
        # The access log records the clinic of every PHI call (docs/architecture.md,
        # invariant 8): a call with no clinic could not be recorded.
        raise fail("phi=True on a repository defined with tenant=False")
    return patient_ids.for_query(
        found.name, row_type=shape.row.target if shape.row else None,
        many=isinstance(shape, Many), streams=shape.streams, params=found.params,
        field=spec.patient_id_field, param=spec.patient_id_param, fail=fail,
    )


def _cache_contract(
    method: str,
    found: sqlfile.SqlQuery,
    spec: QuerySpec,
    cache: CacheSpec | None,
    hints: dict[str, Any],
    fail: Callable[[str], SqlFileError],
) -> Arguments | None:
    """Checks of a cached or invalidating query, and the conversion of its arguments (keys
    and tags must not depend on how a caller spelled a value)."""
    if cache is not None:
        for name in cache.independent_of:
            if name not in tenancy.SHAREABLE_INPUTS:
                raise fail(f"independent_of names {name!r}; it may name only "
                           f"{', '.join(map(repr, tenancy.SHAREABLE_INPUTS))} (the clinic "
                           "and a break-glass are always keyed)")
            if reads_setting(found.sql, name):
                raise fail(f"independent_of={name!r} but the SQL reads app.{name}")
    annotations = {name: hints.get(name, Any) for name in found.params}
    for template in (*spec.invalidates, *(cache.tags if cache else ())):
        _check_template(template, annotations, fail)
    if not found.params:
        return None
    try:
        return Arguments(method, found.params, list(annotations.values()))
    except PydanticUserError as exc:
        raise fail(f"parameters cannot be converted to their declared types ({exc.code})"
                   ) from None


def reads_setting(text: str, name: str) -> bool:
    """Whether SQL text (a statement, a policy expression) names the setting `app.<name>`."""
    return re.search(rf"\bapp\.{re.escape(name)}\b", text, re.IGNORECASE) is not None


def _check_template(
    template: str, annotations: dict[str, Any], fail: Callable[[str], SqlFileError]
) -> None:
    """Refuse at definition a tag that would fail to format at call time, where a write's
    tags fail it only once committed unless formatted before sending: the template is
    formatted with a sample of every type each of its parameters may hold."""
    try:
        fields = _template_fields(template)
    except ValueError:
        raise fail(f"tag {template!r} is not a valid format string") from None
    for name in fields:
        if name not in annotations:
            raise fail(f"tag {template!r} uses {name!r}, which is not a query parameter")
    samples = {name: _samples(annotations[name]) for name in fields}
    if not all(samples.values()):
        return  # a parameter of a type without samples (Any, a class of its own)
    first = {name: values[0] for name, values in samples.items()}
    for name, values in samples.items():
        for value in values:
            try:
                template.format_map({**first, name: value})
            except (ValueError, TypeError, KeyError, AttributeError, IndexError):
                raise fail(f"tag {template!r} cannot be formatted when {name} is a "
                           f"{type_name(type(value))}") from None


def _template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


_SAMPLES: dict[type, Any] = {
    UUID: UUID(int=0), str: "x", bool: False, int: 0, float: 0.0,
    decimal.Decimal: decimal.Decimal(0), datetime.datetime: datetime.datetime(2000, 1, 1),
    datetime.date: datetime.date(2000, 1, 1), datetime.time: datetime.time(0),
    datetime.timedelta: datetime.timedelta(0), bytes: b"",
}
_CONTAINERS: dict[Any, Callable[[list[Any]], Any]] = {
    list: list, Sequence: list, tuple: tuple, set: set, frozenset: frozenset,
}


def _samples(annotation: Any) -> list[Any]:
    """Values of each type a parameter declared `annotation` holds once converted (`X | None`
    counts as X); [] when there is no telling."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _samples(args[0])
    if origin in (types.UnionType, typing.Union):
        return [value for arg in args if arg is not type(None) for value in _samples(arg)]
    if origin is typing.Literal:
        return list(args)
    if origin in _CONTAINERS:
        inner = _samples(args[0]) if args else [None]
        return [_CONTAINERS[origin](inner[:1])] if inner else []
    supertype = getattr(annotation, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return _samples(supertype)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)[:1]
    return [_SAMPLES[annotation]] if annotation in _SAMPLES else []


def _method(
    plan: Plan, declared: Callable[..., Any], cipher: FieldCipher | None = None
) -> Callable[..., Any]:
    call = _plain_call(plan) if cipher is None else _sealed_call(plan, cipher)
    streams = plan.shape.streams

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


def _plain_call(plan: Plan) -> Callable[[Repository, dict[str, Any]], Any]:
    return _measured(plan, plan.bind, lambda runner, bound: runner.run(plan, *bound))


def _sealed_call(plan: Plan, cipher: FieldCipher) -> Callable[[Repository, dict[str, Any]], Any]:
    """The call of a plan with encrypted columns: arguments sealed for the clinic in context
    before they are bound, the result opened for it (hcrepo.sealing). A call of
    its own, so that every other plan's stays as it was."""
    bind = plan.bind
    defaults = plan.defaults

    def sealed_run(runner: Runner, kwargs: dict[str, Any]) -> Any:
        context = runner.fixed_context or tenancy.scope().context
        plan.check_context(context)  # no clinic: refused before any key is looked up
        clinic = context.clinic_id
        assert clinic is not None
        keyring = runner.keyring
        args, sql = bind(cipher.seal({**defaults, **kwargs} if defaults else kwargs, clinic,
                                     keyring))
        return cipher.open(runner.run(plan, args, sql), clinic, keyring)

    return _measured(plan, lambda kwargs: kwargs, sealed_run)


def _measured(
    plan: Plan, prepare: Callable[[dict[str, Any]], T], run: Callable[[Runner, T], Any]
) -> Callable[[Repository, dict[str, Any]], Any]:
    """A repository call: `prepare` the arguments (outside the measure: a wrong argument is
    the caller's, not a failed query), then `run` them under the repository's explicit
    context, measured by the observer."""

    def call(self: Repository, kwargs: dict[str, Any]) -> Any:
        prepared = prepare(kwargs)
        runner = self._runner
        started = perf_counter()
        try:
            if self._explicit is None:
                return run(runner, prepared)
            with tenancy.use(**self._explicit):
                return run(runner, prepared)
        except BaseException as error:
            runner.observer.failed(plan, error)
            raise
        finally:
            runner.observer.finished(plan, perf_counter() - started)

    return call


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
