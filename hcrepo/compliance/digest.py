"""Signed digests of the chain heads: `hcrepo audit digest` prints one for operators to
store outside the database; `verify --digest` checks the chain still holds what it signed.

The signature is an HMAC-SHA256 with HCREPO_AUDIT_DIGEST_KEY over the digest's canonical
JSON (sorted keys, no spaces, without the `hmac` member). A chain rewritten from scratch by
someone who can edit every row is consistent in itself; only heads signed earlier, with a
key the database never saw, tell it apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from hcrepo.errors import HcrepoError

VERSION = 1

_HEADS_SQL = """
SELECT DISTINCT ON (clinic_id) clinic_id, seq, hash FROM audit.chain
ORDER BY clinic_id, seq DESC
"""


class DigestInvalid(HcrepoError):
    """A digest that is not one hcrepo signed with this key (or not a digest at all)."""


def heads(conn: psycopg.Connection) -> dict[UUID, tuple[int, bytes]]:
    """Each clinic chain's last link: seq and hash."""
    return {UUID(str(clinic)): (int(seq), bytes(digest))
            for clinic, seq, digest in conn.execute(_HEADS_SQL).fetchall()}


def make(conn: psycopg.Connection, key: bytes) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": VERSION,
        "time": datetime.now(UTC).isoformat(),
        "heads": {str(clinic): {"seq": seq, "hash": digest.hex()}
                  for clinic, (seq, digest) in sorted(heads(conn).items())},
    }
    return {**body, "hmac": _sign(body, key)}


def signed_heads(digest: object, key: bytes) -> dict[UUID, tuple[int, bytes]]:
    """The heads of a digest whose signature is valid for `key`; `DigestInvalid` otherwise."""
    if not isinstance(digest, dict) or not isinstance(digest.get("hmac"), str):
        raise DigestInvalid("the digest is not a signed hcrepo audit digest")
    body = {name: value for name, value in digest.items() if name != "hmac"}
    if not hmac.compare_digest(_sign(body, key), digest["hmac"]):
        raise DigestInvalid("the digest's HMAC does not match HCREPO_AUDIT_DIGEST_KEY: it was "
                            "signed with another key or changed since")
    try:
        return {UUID(clinic): (int(head["seq"]), bytes.fromhex(head["hash"]))
                for clinic, head in body["heads"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DigestInvalid("the digest is signed but its heads are malformed") from None


def _sign(body: dict[str, Any], key: bytes) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
