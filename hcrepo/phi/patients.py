"""Which patients a PHI call is about: the ids the access log records for it.

Where an id comes from is settled once, when the repository class is defined:

- each row of the result: the field the query names (`@query(..., patient_id_field=...)`),
  else the model's field marked `Annotated[UUID, PatientId()]` (the `id` of a patient
  model), else a field named `patient_id`; rows of other types (scalars, rowcounts) give none;
- the call's arguments: the parameter the query names (`patient_id_param=...`), else one
  named `patient_id`. A call about a patient is recorded as such even when it returns
  nothing or a rowcount (`update_contact(id=...) -> int` declares `patient_id_param="id"`).

At call time extraction is an attribute read per row; ids are only made unique, checked and
formatted off the caller's path, by the access log's writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from operator import attrgetter
from typing import Any

from pydantic import BaseModel

PATIENT_ID = "patient_id"


@dataclass(frozen=True, slots=True)
class PatientId:
    """The field holds the id of the patient the row describes: `id: Annotated[UUID,
    PatientId()]` on a patient model."""


@cache
def marked_field(model: type[BaseModel]) -> str | None:
    """The field of `model` marked `PatientId()`, else one named `patient_id`, else None."""
    for name, info in model.model_fields.items():
        if any(isinstance(item, PatientId) for item in info.metadata):
            return name
    return PATIENT_ID if PATIENT_ID in model.model_fields else None


class PatientIds:
    """The patient ids of one query's calls: `of(value, args)` for a whole result,
    `row_id` for each row of a stream, `from_args` for what the arguments name."""

    __slots__ = ("many", "param", "query", "row_id", "streams")

    def __init__(
        self, query: str, *, row_field: str | None, param: int | None, many: bool,
        streams: bool,
    ) -> None:
        self.query = query
        self.row_id: Callable[[Any], Any] | None = (
            attrgetter(row_field) if row_field is not None else None
        )
        self.param = param
        self.many = many
        self.streams = streams

    def from_args(self, args: Sequence[Any]) -> list[Any]:
        return [args[self.param]] if self.param is not None else []

    def of(self, value: Any, args: Sequence[Any]) -> list[Any]:
        """Ids (unchecked, maybe repeated or None) of a non-streamed result."""
        ids = [args[self.param]] if self.param is not None else []
        row_id = self.row_id
        if row_id is not None and value is not None:
            if self.many:
                ids.extend(map(row_id, value))
            else:
                ids.append(row_id(value))
        return ids


def for_query(
    query: str,
    *,
    row_type: type | None,
    many: bool,
    streams: bool,
    params: Sequence[str],
    field: str | None,
    param: str | None,
    fail: Callable[[str], Exception],
) -> PatientIds:
    """The extraction of a `phi=True` query; `fail(message)` makes the definition error for a
    declaration that names a field or parameter that does not exist."""
    model = row_type if isinstance(row_type, type) and issubclass(row_type, BaseModel) else None
    if field is not None:
        if model is None or field not in model.model_fields:
            raise fail(f"patient_id_field={field!r} is not a field of the result's rows")
        row_field: str | None = field
    else:
        row_field = marked_field(model) if model is not None else None
    if param is not None and param not in params:
        raise fail(f"patient_id_param={param!r} is not a parameter of the query")
    chosen = param if param is not None else (PATIENT_ID if PATIENT_ID in params else None)
    index = list(params).index(chosen) if chosen is not None else None
    return PatientIds(query, row_field=row_field, param=index, many=many, streams=streams)


def unique(ids: Iterable[Any]) -> list[Any]:
    """Ids in first-seen order without repeats or None."""
    return [value for value in dict.fromkeys(ids) if value is not None]
