"""Master keys: where the keys that wrap clinics' data keys come from.

`MasterKeys` is the seam: hcrepo only ever asks it to wrap a fresh data key under the
current master key version, and to unwrap a stored one under the version it names. The
default, `SettingsMasterKeys`, holds the keys from the settings (`HCREPO_MASTER_KEY`, the
current one, and `HCREPO_MASTER_KEY_PREVIOUS`, the ones still wrapping data keys until
`hcrepo keys rotate --master` has re-wrapped them). A KMS replaces it by implementing the
same three members with its encrypt and decrypt calls (the `context` bytes as the KMS's
encryption context) and being passed as `Database(settings, master_keys=...)`.

A setting holds `base64` (version 1) or `version:base64`; the previous keys are a comma
separated list of `version:base64`. Keys are 32 bytes (AES-256).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hcrepo.crypto.envelope import KEY_BYTES
from hcrepo.errors import ConfigError, DecryptionFailed

MASTER_KEY = "HCREPO_MASTER_KEY"
MASTER_KEY_PREVIOUS = "HCREPO_MASTER_KEY_PREVIOUS"
BLIND_INDEX_KEY = "HCREPO_BLIND_INDEX_KEY"
_NONCE = 12


class MasterKeys(Protocol):
    """Wraps and unwraps data keys; `context` names the clinic and data key version."""

    @property
    def current_version(self) -> int: ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """`data_key` wrapped under the current version."""

    def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        """The data key `wrapped` under master key `version`; `DecryptionFailed` when it
        does not unwrap, `ConfigError` naming the setting when that version is not known."""


def key_bytes(text: str) -> bytes:
    """A 32-byte key from base64 (standard or URL-safe); ValueError saying why not."""
    try:
        raw = base64.b64decode(text.strip().replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 of a 32-byte key") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes; the key must have {KEY_BYTES}")
    return raw


def parse_versioned(text: str, *, default_version: int | None) -> dict[int, bytes]:
    """`[version:]base64[, ...]` as {version: key}; ValueError saying what is wrong (never
    the key)."""
    keys: dict[int, bytes] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        version_text, colon, key_text = item.rpartition(":")
        if not colon:
            if default_version is None:
                raise ValueError("each key must read 'version:base64'")
            version_text, key_text = str(default_version), item
        if not version_text.isdigit() or int(version_text) < 1:
            raise ValueError("a key version must be a positive integer")
        version = int(version_text)
        if version in keys:
            raise ValueError(f"key version {version} appears twice")
        keys[version] = key_bytes(key_text)
    return keys


class SettingsMasterKeys:
    """The master keys from the settings: AES-256-GCM key wrapping, in process."""

    def __init__(self, current: str, previous: str = "") -> None:
        try:
            now = parse_versioned(current, default_version=1)
        except ValueError as exc:
            raise ConfigError(MASTER_KEY, str(exc)) from None
        if len(now) != 1:
            raise ConfigError(MASTER_KEY, "holds exactly one key (older ones go in "
                              f"{MASTER_KEY_PREVIOUS})")
        try:
            older = parse_versioned(previous, default_version=None)
        except ValueError as exc:
            raise ConfigError(MASTER_KEY_PREVIOUS, str(exc)) from None
        (self._version, key), = now.items()
        if self._version in older:
            raise ConfigError(MASTER_KEY_PREVIOUS, f"repeats version {self._version}, the "
                              f"current one in {MASTER_KEY}")
        self._keys = {**older, self._version: key}

    def __repr__(self) -> str:
        return f"SettingsMasterKeys(current_version={self._version}, versions={sorted(self._keys)})"

    @property
    def current_version(self) -> int:
        return self._version

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self._keys[self._version]).encrypt(nonce, data_key, context)

    def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        key = self._keys.get(version)
        if key is None:
            setting = MASTER_KEY if version > self._version else MASTER_KEY_PREVIOUS
            raise ConfigError(setting, f"has no master key version {version}, which still "
                              "wraps a data key (run 'hcrepo keys rotate --master' before "
                              "removing a version)")
        try:
            return AESGCM(key).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], context)
        except (InvalidTag, ValueError):
            raise DecryptionFailed(
                f"a data key does not unwrap under master key version {version} "
                f"({MASTER_KEY} or {MASTER_KEY_PREVIOUS} holds another key for it)"
            ) from None
