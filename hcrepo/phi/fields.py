"""What a row model declares about its fields.

A field holding protected health information is annotated `Annotated[str, PHI()]`; one that
is also stored encrypted, `Annotated[str | None, Encrypted()]`. The field stays a plain `str`
for the type checker and for attribute access; the markers are read from pydantic's field
metadata by whatever must treat the value with care (masking, encryption, the audit trail).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class PHI:
    """The field holds protected health information: masked wherever it is printed or logged."""


@dataclass(frozen=True, slots=True)
class Encrypted(PHI):
    """PHI stored as ciphertext: encrypted before it leaves the process, decrypted on return."""


@cache
def phi_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` declared PHI (encrypted ones included)."""
    return _marked(model, PHI)


@cache
def encrypted_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` declared encrypted."""
    return _marked(model, Encrypted)


def _marked(model: type[BaseModel], marker: type[PHI]) -> frozenset[str]:
    return frozenset(
        name for name, info in model.model_fields.items()
        if any(isinstance(item, marker) for item in info.metadata)
    )
