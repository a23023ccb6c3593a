"""`PhiModel`: a pydantic model whose repr and str mask the fields marked PHI.

Attribute access, `model_dump`, JSON, equality and hashing are pydantic's own: only what
pydantic prints goes through `__repr_args__`, which this base overrides. Nested models and
lists of models print their own repr, so they are masked when they are `PhiModel`s too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from hcrepo.phi.fields import phi_fields
from hcrepo.phi.names import forget
from hcrepo.phi.text import MASK


class _Masked:
    """Prints as a masked string value would: `'***'`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


_MASKED = _Masked()


class PhiModel(BaseModel):
    """Base of application models holding PHI: mark fields with `Annotated[str, PHI()]`."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        forget()  # its PHI field names now name PHI in dicts and text too

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        marked = phi_fields(type(self))
        for name, value in super().__repr_args__():
            yield name, (_MASKED if name in marked and value is not None else value)
