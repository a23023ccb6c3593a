"""Fresh key material for the tests that encrypt."""

from __future__ import annotations

import base64
import os


def new_key() -> str:
    """A random 256-bit key, base64, as HCREPO_MASTER_KEY and HCREPO_BLIND_INDEX_KEY take it."""
    return base64.b64encode(os.urandom(32)).decode()
