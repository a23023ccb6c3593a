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
from functools import lru_cache
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hcrepo.errors import DecryptionFailed

PREFIX = "hc1:"
KEY_BYTES = 32
_NONCE = 12


def associated_data(clinic_id: UUID, table: str, column: str, row_id: UUID) -> bytes:
    """What a value is bound to: the UUIDs as their 16 bytes around the `table.column` name
    (a plain identifier pair, no '|'), so no two bindings share an encoding. Bytes, not
    text: formatting two UUIDs as text cost more than the decryption."""
    return b"hcrepo:v1|%b|%b|%b" % (clinic_id.bytes, f"{table}.{column}".encode(), row_id.bytes)


def seal(key: bytes, version: int, plaintext: str, aad: bytes) -> str:
    nonce = os.urandom(_NONCE)
    sealed = _aead(key).encrypt(nonce, plaintext.encode("utf-8"), aad)
    return f"{PREFIX}{version}:{base64.b64encode(nonce + sealed).decode('ascii')}"


def parse(text: str, where: str) -> tuple[int, bytes]:
    """(data key version, nonce + ciphertext + tag) of a stored value; `DecryptionFailed` if
    it is not one of hcrepo's ciphertexts (plaintext left over, or a damaged value). Split by
    hand: a regular expression cost a third of a decryption."""
    prefix, _, rest = text.partition(":")
    version, _, body = rest.partition(":")
    if (prefix != "hc1" or not (version.isascii() and version.isdigit())
            or not 0 < len(version) < 10 or version[0] == "0"):
        raise DecryptionFailed(f"{where} does not hold an hcrepo ciphertext")
    try:
        raw = binascii.a2b_base64(body, strict_mode=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < _NONCE + 16:
        raise DecryptionFailed(f"{where} does not hold an hcrepo ciphertext")
    return int(version), raw


def decrypt(key: bytes, raw: bytes, aad: bytes, where: str) -> str:
    """The plaintext of a parsed value sealed with `key` and bound to `aad`."""
    try:
        return _aead(key).decrypt(raw[:_NONCE], raw[_NONCE:], aad).decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        # The usual cause: the value was copied from another row or clinic, whose binding
        # it carries; or it was changed. Never the value in the message (invariant 7).
        raise DecryptionFailed(
            f"{where} does not authenticate for this clinic and row (copied from another "
            "row or clinic, or altered)"
        ) from None


@lru_cache(maxsize=4096)
def _aead(key: bytes) -> AESGCM:
    """One AESGCM per data key (its key schedule made once), most recently used kept."""
    return AESGCM(key)
