"""Where hcrepo's own data directories (`sql/`, `migrations/`) live in this installation.

A checkout keeps them at the top level, next to the package; a wheel ships them inside it as
`hcrepo/_data/<name>` (see setup.py).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The shipped directory `name` (`"sql"` or `"migrations"`): wheel first, then checkout."""
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"hcrepo's {name}/ directory is missing from this installation")
