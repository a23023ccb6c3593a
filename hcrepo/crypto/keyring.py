"""Clinics' data keys: created on first use, stored wrapped, cached unwrapped in process.

Each clinic has data key versions 1, 2, ... (`clinic_data_keys`, under row-level security
like every tenant table); one is active, the one new values are sealed with, and every
version stays usable for reading. A key's bytes never change once made (re-wrapping under
another master key changes only its stored form), so unwrapped keys are cached for the
life of the process (bounded, first loaded out). Which version is active is cached
for `ACTIVE_TTL` seconds: a process picks up a rotation within that time, and values it
sealed meanwhile under the previous version stay readable and are re-encrypted by the
next `hcrepo keys rotate --data`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import NamedTuple, Protocol
from uuid import UUID

from hcrepo.crypto.blind_index import BlindIndex
from hcrepo.crypto.envelope import KEY_BYTES
from hcrepo.crypto.keys import BLIND_INDEX_KEY, MASTER_KEY, MasterKeys
from hcrepo.errors import ConfigError, DecryptionFailed

ACTIVE_TTL = 30.0
MAX_KEYS = 4096


class StoredKey(NamedTuple):
    version: int
    master_version: int
    wrapped: bytes
    active: bool


class DataKeyStore(Protocol):
    """Where wrapped data keys live (the database's `clinic_data_keys`)."""

    def load(self, clinic_id: UUID) -> list[StoredKey]:
        """Every data key version of the clinic."""

    def create_first(self, clinic_id: UUID, master_version: int, wrapped: bytes) -> None:
        """Store version 1 as the active key unless the clinic has a key already (another
        process may have made one first: then nothing changes)."""


def wrap_context(clinic_id: UUID, version: int) -> bytes:
    """What a wrapped data key is bound to: a wrapped key copied to another clinic or
    version does not unwrap."""
    return f"hcrepo data key|{clinic_id}|{version}".encode()


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


class Keyring:
    """Data keys per clinic and version, and the blind index, for the runners."""

    def __init__(
        self, master: MasterKeys | None, store: DataKeyStore, blind_index: BlindIndex | None
    ) -> None:
        self._master = master
        self._store = store
        self._blind = blind_index
        self._lock = threading.Lock()
        self._keys: dict[tuple[UUID, int], bytes] = {}
        self._active: dict[UUID, tuple[int, float]] = {}

    def __repr__(self) -> str:
        return f"Keyring(<{len(self._keys)} data keys>)"

    def blind_index(self, where: str) -> BlindIndex:
        if self._blind is None:
            raise ConfigError(BLIND_INDEX_KEY, f"is required to search or write {where}")
        return self._blind

    def active(self, clinic_id: UUID, where: str) -> tuple[int, bytes]:
        """The version new values of the clinic are sealed with, and its key."""
        with self._lock:
            cached = self._active.get(clinic_id)
            if cached is not None and time.monotonic() - cached[1] < ACTIVE_TTL:
                key = self._keys.get((clinic_id, cached[0]))
                if key is not None:
                    return cached[0], key
        version = self._refresh(clinic_id, where)
        if version is None:
            master = self._master_keys(where)
            self._store.create_first(clinic_id, master.current_version,
                                     master.wrap(new_data_key(), wrap_context(clinic_id, 1)))
            version = self._refresh(clinic_id, where)
        if version is None:
            raise DecryptionFailed(f"clinic has no active data key for {where}")
        return version, self.key(clinic_id, version, where)

    def key(self, clinic_id: UUID, version: int, where: str) -> bytes:
        """The clinic's data key `version` (for reading values sealed with it). A hit takes
        no lock and leaves the order alone (a dict read is atomic): the bound evicts the
        keys loaded first, which a process serving many clinics loads again in one trip."""
        key = self._keys.get((clinic_id, version))
        if key is not None:
            return key
        self._refresh(clinic_id, where)
        with self._lock:
            key = self._keys.get((clinic_id, version))
        if key is None:
            raise DecryptionFailed(f"{where} was sealed with a data key version this clinic "
                                   "does not have")
        return key

    def _refresh(self, clinic_id: UUID, where: str) -> int | None:
        """Load and unwrap the clinic's keys (one round trip); its active version."""
        stored = self._store.load(clinic_id)
        if not stored:
            return None
        master = self._master_keys(where)
        unwrapped = {
            key.version: master.unwrap(key.master_version, key.wrapped,
                                       wrap_context(clinic_id, key.version))
            for key in stored
        }
        active = next((key.version for key in stored if key.active), None)
        with self._lock:
            for version, key in unwrapped.items():
                self._keys[(clinic_id, version)] = key
            while len(self._keys) > MAX_KEYS:
                del self._keys[next(iter(self._keys))]
            if active is not None:
                self._active[clinic_id] = (active, time.monotonic())
                while len(self._active) > MAX_KEYS:
                    del self._active[next(iter(self._active))]
        return active

    def _master_keys(self, where: str) -> MasterKeys:
        if self._master is None:
            raise ConfigError(MASTER_KEY, f"is required to encrypt or decrypt {where}")
        return self._master
