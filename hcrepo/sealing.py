"""Encrypted columns in a repository call: arguments sealed before they leave the process,
results opened before the caller sees them.

A query declares its encrypted columns in its `.sql` block and the row model marks the
field `Encrypted()` (hcrepo.phi.fields); the two are checked against each other when
the repository class is defined, so a model field declared encrypted is never handed out
as ciphertext because a query forgot its directive:

    -- name: create_patient
    -- encrypt: patients.ssn                  the argument `ssn` is sent as ciphertext
    -- blind_index: patients.ssn using digits :ssn_bidx is the blind index of `ssn`
    -- generate: id                           :id is a new UUID made here (the AAD needs it)

A value is bound to (clinic, table, column, row id): the row id is the `id` argument when
sealing, the row's `id` field when opening. An encrypted field is a plain `str` (or
`str | None`): rows are validated with the ciphertext, then again with the plaintext. A plan
without these directives never reaches this module (hcrepo.repository builds the plain call
for it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from hcrepo.crypto import envelope
from hcrepo.crypto.blind_index import NORMALISERS
from hcrepo.crypto.keyring import Keyring
from hcrepo.phi.fields import encrypted_fields
from hcrepo.sqlfile import Column, SqlQuery

ROW_ID = "id"


class FieldCipher:
    """The sealing and opening one repository method needs, built when its class is."""

    __slots__ = ("_consumed", "_generated", "_indexed", "_method", "_name", "_opened",
                 "_passes", "_sealed", "_validator")

    def __init__(self, method: str, query: SqlQuery, model: type[BaseModel] | None) -> None:
        self._method = method
        self._name = query.name
        self._generated = query.generated
        self._sealed = tuple(c for c in query.encrypted if c.column in query.params)
        self._indexed = query.blind_indexed
        # Arguments that feed only a blind index: the plaintext itself is never sent.
        self._consumed = tuple(b.column for b in query.blind_indexed
                               if b.column not in query.params)
        self._opened: tuple[tuple[Column, str], ...] = ()
        self._validator: Callable[[Any], Any] | None = None
        if model is not None:
            by_column = {c.column: c for c in query.encrypted}
            self._opened = tuple((by_column[f], self._where(by_column[f]))
                                 for f in sorted(encrypted_fields(model)) if f in by_column)
            self._validator = model.__pydantic_validator__.validate_python
        self._passes = not (self._generated or self._sealed or self._indexed)

    @staticmethod
    def problems(query: SqlQuery, model: type[BaseModel] | None) -> list[str]:
        """What is inconsistent between the query's directives and its row model."""
        found: list[str] = []
        declared = {c.column for c in query.encrypted}
        if model is not None and query.returns_rows:
            for name in sorted(encrypted_fields(model) - declared):
                found.append(f"{model.__name__}.{name} is declared Encrypted() but the query "
                             f"has no '-- encrypt: <table>.{name}' directive")
            if encrypted_fields(model) & declared and ROW_ID not in model.model_fields:
                found.append(f"{model.__name__} needs an '{ROW_ID}' field: encrypted values "
                             "are bound to their row")
            for name in sorted(encrypted_fields(model)):
                if model.model_fields[name].annotation not in (str, str | None):
                    found.append(f"{model.__name__}.{name} is encrypted: its type must be "
                                 "str or str | None (the ciphertext is validated as one)")
        if any(c.column in query.params for c in query.encrypted) and ROW_ID not in query.params:
            found.append(f"an encrypted parameter needs :{ROW_ID} in the SQL (or "
                         f"'-- generate: {ROW_ID}' for a new row): values are bound to their row")
        return found

    def signature(self, params: tuple[str, ...]) -> set[str]:
        """The SQL parameters a method declares: without the ones made here, with the
        arguments that only feed a blind index."""
        made = set(self._generated) | {b.param for b in self._indexed}
        return (set(params) - made) | set(self._consumed)

    def seal(self, kwargs: dict[str, Any], clinic_id: UUID, keyring: Keyring) -> dict[str, Any]:
        """`kwargs` as the SQL takes them: encrypted columns sealed, blind indexes and
        generated ids added, plaintext used only for an index dropped."""
        if self._passes:
            return kwargs  # a read that only decrypts
        sealed = dict(kwargs)
        for name in (*self._generated, *(b.param for b in self._indexed)):
            if name in sealed:
                raise TypeError(f"{self._method}() got unexpected keyword arguments [{name!r}]")
            if name in self._generated:
                sealed[name] = uuid.uuid4()
        for indexed in self._indexed:
            value = sealed.get(indexed.column)
            sealed[indexed.param] = None if value is None else keyring.blind_index(
                self._where(indexed)).index(
                clinic_id, indexed.table, indexed.column,
                self._normalised(indexed.column, value, indexed.normaliser))
        if self._sealed:
            row_id = self._row_id(sealed.get(ROW_ID))
            for column in self._sealed:
                value = sealed.get(column.column)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise TypeError(f"{self._method}() argument {column.column!r} is not a "
                                    "valid str")
                where = self._where(column)
                version, key = keyring.active(clinic_id, where)
                sealed[column.column] = envelope.seal(
                    key, version, value,
                    envelope.associated_data(clinic_id, column.table, column.column, row_id))
        for name in self._consumed:
            sealed.pop(name, None)
        return sealed

    def open(self, result: Any, clinic_id: UUID, keyring: Keyring) -> Any:
        """A call's result with its encrypted fields decrypted; counts and None pass
        through."""
        if not self._opened or result is None:
            return result
        if isinstance(result, BaseModel):
            return self._open_row(result, clinic_id, keyring)
        if isinstance(result, list):
            return [self._open_row(row, clinic_id, keyring) for row in result]
        if isinstance(result, Iterator):
            return self._open_stream(result, clinic_id, keyring)
        return result

    def _open_stream(self, rows: Iterator[Any], clinic_id: UUID, keyring: Keyring
                     ) -> Iterator[Any]:
        try:
            for row in rows:
                yield self._open_row(row, clinic_id, keyring)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def _open_row(self, row: BaseModel, clinic_id: UUID, keyring: Keyring) -> Any:
        values: dict[str, Any] | None = None
        for column, where in self._opened:
            text = getattr(row, column.column)
            if text is None:
                continue
            version, raw = envelope.parse(text, where)
            aad = envelope.associated_data(clinic_id, column.table, column.column,
                                           getattr(row, ROW_ID))
            values = values or dict(row.__dict__)
            values[column.column] = envelope.decrypt(keyring.key(clinic_id, version, where),
                                                     raw, aad, where)
        if values is None:
            return row
        assert self._validator is not None
        return self._validator(values)  # validated again, with the plaintext

    def _where(self, column: Column | Any) -> str:
        return f"{column.table}.{column.column} ({self._name})"

    def _row_id(self, value: Any) -> UUID:
        try:
            return value if isinstance(value, UUID) else UUID(str(value))
        except ValueError:
            raise TypeError(f"{self._method}() argument {ROW_ID!r} is not a valid UUID"
                            ) from None

    def _normalised(self, name: str, value: Any, normaliser: str) -> str:
        normalised = NORMALISERS[normaliser](value) if isinstance(value, str) else None
        if normalised is None:
            raise TypeError(f"{self._method}() argument {name!r} is not a valid "
                            f"{normaliser} value")
        return normalised
