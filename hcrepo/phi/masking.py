"""`mask(obj)`: a copy of `obj` fit to print or log, for application code and log records.

- a pydantic model becomes a dict of its fields, the ones marked PHI masked: a masked copy is
  never mistaken for, or written back as, the real row;
- a mapping keeps its shape; a value under a key that names PHI (`hcrepo.phi.names`) is
  masked whole, whatever it is (a string, a date, a nested dict);
- lists, tuples and sets keep their type, their items masked;
- a string is masked as free text (`hcrepo.phi.text`);
- an exception becomes a copy of the same class with its args, attributes, notes and chain
  masked and its traceback kept (so a log tool still prints where it happened);
- anything else (numbers, UUIDs, datetimes, None) is returned as it is.

None stays None under a PHI key: it says a value is absent, not what it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from hcrepo.phi.fields import phi_fields
from hcrepo.phi.names import learn, normalise, phi_keys
from hcrepo.phi.text import MASK, mask_text


def mask(obj: Any) -> Any:
    """A masked copy of `obj` (see the module's docstring for what each kind becomes)."""
    return _Masker().mask(obj)


def mask_exception(error: BaseException) -> BaseException:
    """A copy of `error`, of its class, masked; the original is left untouched."""
    return _Masker().exception(error)


class _Masker:
    """One masking pass: shared objects and cycles are masked once."""

    def __init__(self) -> None:
        self._keys = phi_keys()
        self._done: dict[int, Any] = {}

    def mask(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, float)):
            return obj
        if isinstance(obj, str):
            return mask_text(obj)
        done = self._done.get(id(obj))
        if done is not None:
            return done
        if isinstance(obj, BaseException):
            return self.exception(obj)
        if isinstance(obj, BaseModel):
            return self._model(obj)
        if isinstance(obj, Mapping):
            return self._mapping(obj)
        if isinstance(obj, (list, tuple, set, frozenset)):
            return self._collection(obj)
        return obj

    def exception(self, error: BaseException) -> BaseException:
        done = self._done.get(id(error))
        if done is not None:
            return done  # type: ignore[no-any-return]
        kind = type(error)
        args = tuple(self.mask(arg) for arg in error.args)
        try:
            # Not kind(*args): an __init__ may take other arguments than it stores in args.
            copy = kind.__new__(kind, *args)
            copy.args = args
            str(copy)
        except Exception:
            copy = MaskedError(f"{kind.__module__}.{kind.__qualname__}: {mask_text(str(error))}")
        self._done[id(error)] = copy
        for name, value in vars(error).items():
            if name != "__notes__":
                setattr(copy, name, self._masked_entry(name, value))
        notes = getattr(error, "__notes__", None)
        if isinstance(notes, list):
            copy.__notes__ = [mask_text(note) if isinstance(note, str) else note
                              for note in notes]
        copy.__traceback__ = error.__traceback__
        copy.__suppress_context__ = error.__suppress_context__
        if error.__cause__ is not None:
            copy.__cause__ = self.exception(error.__cause__)
        if error.__context__ is not None:
            copy.__context__ = self.exception(error.__context__)
        return copy

    def _model(self, model: BaseModel) -> dict[str, Any]:
        kind = type(model)
        learn(kind)
        marked = phi_fields(kind)
        masked: dict[str, Any] = {}
        self._done[id(model)] = masked
        for name in kind.model_fields:
            value = getattr(model, name)
            masked[name] = self._phi(value) if name in marked else self._masked_entry(name, value)
        return masked

    def _mapping(self, mapping: Mapping[Any, Any]) -> dict[Any, Any]:
        masked: dict[Any, Any] = {}
        self._done[id(mapping)] = masked
        for key, value in mapping.items():
            masked[key] = self._masked_entry(key, value)
        return masked

    def _collection(self, items: Any) -> Any:
        if isinstance(items, list):
            masked: list[Any] = []
            self._done[id(items)] = masked
            masked.extend(self.mask(item) for item in items)
            return masked
        return type(items)(self.mask(item) for item in items)

    def _masked_entry(self, key: object, value: Any) -> Any:
        if isinstance(key, str) and normalise(key) in self._keys:
            return self._phi(value)
        return self.mask(value)

    @staticmethod
    def _phi(value: Any) -> Any:
        return None if value is None else MASK


class MaskedError(Exception):
    """Stands in for an exception that cannot be copied as its own class."""
