"""Cache entries: a small versioned header, then the value as JSON, zlib-compressed when that
pays, AES-GCM-encrypted when it is PHI.

    byte  0      codec version (an entry written by another version reads as a miss)
    byte  1      flags: 1 encrypted, 2 compressed
    bytes 2-9    soft expiry, ms since the Unix epoch
    bytes 10-13  how long the database read took, µs (for XFetch)
    bytes 14-21  position: a WAL LSN the value reflects every commit up to (read-your-writes)
    byte  22     n, the number of generation tokens
    bytes 23-30  fingerprint of the Redis key the entry was written under
    n x 8 bytes  the generation tokens of its tags, as they were when its read began
    the rest     JSON, or a 12-byte nonce and the AES-GCM ciphertext of it

An entry read under any other key than its own (copied, or a reply crossed on a confused
connection) is a miss: plain entries by the fingerprint, encrypted ones also because the
AES-GCM associated data is the key and the header, so edited tokens fail to authenticate too.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from hcrepo.results import Many, One, OneOrNone, Shape

CODEC_VERSION = 2
TOKEN_SIZE = 8
ENCRYPTED = 1
COMPRESSED = 2
_HEAD = struct.Struct(">BBQIQB8s")
_NONCE = 12
_COMPRESS_FROM = 1024


class Unreadable(ValueError):
    """An entry that cannot be used: wrong version, truncated, tampered, or stale schema."""


class Entry(NamedTuple):
    flags: int
    soft_expiry_ms: int
    load_us: int
    position: int
    fingerprint: bytes
    tokens: bytes  # the n tokens, concatenated: compared to the current ones in one step
    body_start: int


def read_header(raw: bytes) -> Entry:
    if len(raw) < _HEAD.size or raw[0] != CODEC_VERSION:
        raise Unreadable("not an entry of this codec version")
    _, flags, soft_expiry_ms, load_us, position, count, fingerprint = _HEAD.unpack_from(raw)
    body_start = _HEAD.size + count * TOKEN_SIZE
    if len(raw) < body_start:
        raise Unreadable("truncated entry")
    return Entry(flags, soft_expiry_ms, load_us, position, fingerprint,
                 raw[_HEAD.size:body_start], body_start)


def fingerprint(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def rewrite_soft_expiry(raw: bytes, soft_expiry_ms: int) -> bytes:
    """The same entry with another soft expiry (plain entries only: the header is signed)."""
    entry = read_header(raw)
    if entry.flags & ENCRYPTED:
        raise Unreadable("an encrypted entry's header is authenticated and cannot change")
    head = _HEAD.pack(CODEC_VERSION, entry.flags, soft_expiry_ms, entry.load_us,
                      entry.position, len(entry.tokens) // TOKEN_SIZE, entry.fingerprint)
    return head + raw[_HEAD.size:]


def value_type(shape: Shape) -> Any:
    """The Python type a read's shape returns, or None when its results are not cacheable."""
    if shape.row is None or type(shape) not in (OneOrNone, One, Many):
        return None
    target: Any = shape.row.target
    if isinstance(shape, OneOrNone):
        return target | None
    if isinstance(shape, Many):
        return list[target]
    return target


class ValueCodec:
    """Encodes and decodes one query's results; `encrypt` binds it to the AES key."""

    def __init__(self, annotation: Any, cipher: AESGCM | None) -> None:
        row = annotation
        for arg in getattr(annotation, "__args__", ()):
            if arg is not type(None):
                row = arg
        is_model = isinstance(row, type) and issubclass(row, BaseModel)
        config = None if is_model else ConfigDict(ser_json_bytes="base64",
                                                  val_json_bytes="base64")
        self._adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=config)
        self._cipher = cipher
        try:
            self.schema: object = self._adapter.json_schema(mode="serialization")
        except Exception:  # a type with no JSON schema: fall back to its field layout
            self.schema = repr(getattr(row, "model_fields", row))

    @property
    def encrypts(self) -> bool:
        return self._cipher is not None

    def encode(
        self, value: Any, *, key: str, soft_expiry_ms: int, load_us: int, position: int,
        tokens: bytes,
    ) -> bytes:
        body = self._adapter.dump_json(value, warnings=False)
        flags = 0
        if len(body) >= _COMPRESS_FROM:
            packed = zlib.compress(body, 1)
            if len(packed) * 8 < len(body) * 7:
                body, flags = packed, COMPRESSED
        if self._cipher is not None:
            flags |= ENCRYPTED
        head = _HEAD.pack(CODEC_VERSION, flags, soft_expiry_ms, min(load_us, 0xFFFFFFFF),
                          position, len(tokens) // TOKEN_SIZE, fingerprint(key)) + tokens
        if self._cipher is None:
            return head + body
        nonce = os.urandom(_NONCE)
        return head + nonce + self._cipher.encrypt(nonce, body, key.encode() + head)

    def decode(self, raw: bytes, entry: Entry, *, key: str) -> Any:
        if entry.fingerprint != fingerprint(key):
            raise Unreadable("entry of another key")
        body = raw[entry.body_start:]
        try:
            if entry.flags & ENCRYPTED:
                if self._cipher is None:
                    raise Unreadable("encrypted entry and no key")
                body = self._cipher.decrypt(body[:_NONCE], body[_NONCE:],
                                            key.encode() + raw[:entry.body_start])
            elif self._cipher is not None:
                raise Unreadable("plaintext entry for an encrypted query")
            if entry.flags & COMPRESSED:
                body = zlib.decompress(body)
            return self._adapter.validate_json(body)
        except (InvalidTag, zlib.error, ValidationError, ValueError) as exc:
            raise Unreadable(type(exc).__name__) from None
