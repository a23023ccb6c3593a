"""Which names name PHI: the key of a dict, the label of a value in free text.

A fixed list of the spellings PHI travels under in application code and logs, plus the name
of every field marked `PHI()` in the pydantic models loaded. A name is compared normalised:
`firstName`, `First-Name`, `FIRST_NAME` and `first name` are all `first_name`.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from pydantic import BaseModel

from hcrepo.phi.fields import phi_fields

# Patients' identifiers (HIPAA Safe Harbor's list, as fields are usually called) and the free
# text written about them. Staff and providers' names come in through the models' markers.
FIXED_KEYS = frozenset({
    "first_name", "last_name", "middle_name", "full_name", "given_name", "family_name",
    "maiden_name", "patient_name", "name",
    "date_of_birth", "dob", "birth_date", "birthdate", "birthday",
    "ssn", "social_security_number", "social_security",
    "phone", "phone_number", "mobile", "mobile_phone", "telephone", "fax",
    "email", "email_address", "e_mail",
    "address", "street", "street_address", "home_address", "postal_address",
    "mrn", "medical_record_number",
    "note", "notes", "clinical_note", "diagnosis", "diagnoses", "diagnosis_codes",
})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[\s\-.]+")
_lock = threading.Lock()
_known: frozenset[str] | None = None
_generation = 0  # bumped by forget(): a walk that began before it must not be kept


@lru_cache(maxsize=4096)  # the same few keys come back in every record
def normalise(name: str) -> str:
    return _SEPARATORS.sub("_", _CAMEL.sub("_", name.strip())).lower()


def phi_keys() -> frozenset[str]:
    """The fixed names and every field marked PHI in a model loaded when first asked (models
    defined later join when they are `PhiModel`s, or when `mask` meets one)."""
    known = _known
    if known is None:
        known = _refresh()
    return known


def learn(model: type[BaseModel]) -> None:
    """Add `model`'s PHI fields, if it brings new ones (a model defined after the walk)."""
    if not {normalise(name) for name in phi_fields(model)} <= phi_keys():
        forget()


def forget() -> None:
    """Drop the names found so far: the next use walks the loaded models again."""
    global _known, _generation
    with _lock:
        _known = None
        _generation += 1


def _refresh() -> frozenset[str]:
    global _known
    with _lock:
        started = _generation
    names = set(FIXED_KEYS)
    for model in _loaded_models():
        names.update(normalise(name) for name in phi_fields(model))
    known = frozenset(names)
    with _lock:
        if _generation == started:  # else a model came in during the walk: walk again later
            _known = known
    return known


def _loaded_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                pending.append(sub)
    return seen
