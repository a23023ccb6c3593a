"""Blind indexes: exact-match search over encrypted columns with a keyed HMAC.

The index of a value is HMAC-SHA256 of its normalised form under a key derived per clinic
and column (HKDF-SHA256 of `HCREPO_BLIND_INDEX_KEY`), stored beside the ciphertext. Equal
values in one clinic and column index alike (so a UNIQUE constraint holds and an equality
search uses a B-tree); the same value in another clinic or column indexes differently, and
without the key an index says nothing about the value. The index is kept apart from the
data keys: rotating those does not touch it.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from uuid import UUID

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Normaliser = Callable[[str], str | None]


def _digits(value: str) -> str | None:
    """Digits only ("123-45-6789", "123 45 6789" and "123456789" are one SSN); None for a
    value with no digit at all, or with characters other than ASCII digits, spaces and
    dashes."""
    digits = value.replace("-", "").replace(" ", "")
    return digits if digits.isascii() and digits.isdigit() else None


def _text(value: str) -> str | None:
    """Unicode NFKC, case-folded, outer whitespace removed; None when nothing is left."""
    folded = unicodedata.normalize("NFKC", value).casefold().strip()
    return folded or None


NORMALISERS: dict[str, Normaliser] = {"digits": _digits, "text": _text}


class BlindIndex:
    """Blind indexes under one root key."""

    __slots__ = ("_derive",)

    def __init__(self, root: bytes) -> None:
        @lru_cache(maxsize=4096)
        def derive(clinic_id: UUID, table: str, column: str) -> bytes:
            return HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"hcrepo blind index|{clinic_id}|{table}.{column}".encode(),
            ).derive(root)

        self._derive = derive

    def __repr__(self) -> str:
        return "BlindIndex(<key>)"

    def index(self, clinic_id: UUID, table: str, column: str, normalised: str) -> bytes:
        """The 32-byte HMAC (bytea in the database: compared byte by byte, where text would
        go through the collation)."""
        key = self._derive(clinic_id, table, column)
        return hmac.digest(key, normalised.encode("utf-8"), "sha256")
