"""The stored form of an encrypted field: AES-256-GCM under a clinic's data key, as text.

    hc1:<data key version>:<base64 of 12-byte nonce + ciphertext + 16-byte tag>

Text, not bytea, so that a ciphertext validates as the model's plain `str` field on its way
through the cache and the database can check its shape (`patients_ssn_is_ciphertext`) and
count values per key version (`hcrepo keys status`) without the key. The associated data
binds the value to its clinic, table, column and row: a ciphertext copied to another row or
clinic does not authenticate there.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hcrepo.errors import DecryptionFailed

PREFIX = "hc1:"
KEY_BYTES = 32
_NONCE = 12
_SHAPE = re.compile(r"^hc1:([1-9][0-9]{0,8}):([A-Za-z0-9+/]+={0,2})$")


def associated_data(clinic_id: UUID, table: str, column: str, row_id: UUID) -> bytes:
    """What a value is bound to; every part has a fixed form (UUIDs canonical, names plain
    identifiers), so no two bindings share an encoding."""
    return f"hcrepo:v1|{clinic_id}|{table}.{column}|{row_id}".encode()


def seal(key: bytes, version: int, plaintext: str, aad: bytes) -> str:
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), aad)
    return f"{PREFIX}{version}:{base64.b64encode(nonce + sealed).decode('ascii')}"


def key_version(text: str, where: str) -> int:
    """The data key version a stored value was sealed with (`DecryptionFailed` if it is not
    one of hcrepo's ciphertexts: plaintext left over, or a damaged value)."""
    found = _SHAPE.match(text)
    if found is None:
        raise DecryptionFailed(f"{where} does not hold an hcrepo ciphertext")
    return int(found.group(1))


def open_sealed(key: bytes, text: str, aad: bytes, where: str) -> str:
    found = _SHAPE.match(text)
    if found is None:
        raise DecryptionFailed(f"{where} does not hold an hcrepo ciphertext")
    try:
        raw = base64.b64decode(found.group(2), validate=True)
        if len(raw) < _NONCE + 16:
            raise ValueError
        return AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], aad).decode("utf-8")
    except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
        # The usual cause: the value was copied from another row or clinic, whose binding
        # it carries; or it was changed. Never the value in the message (invariant 7).
        raise DecryptionFailed(
            f"{where} does not authenticate for this clinic and row (copied from another "
            "row or clinic, or altered)"
        ) from None
