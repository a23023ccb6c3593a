"""The `hcrepo` command run as a user runs it: a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hcrepo(
    *args: str, env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """`python -m hcrepo ARGS` with only PATH, the checkout and `env` in its environment
    (no DATABASE_URL etc. leaks in from the caller); stdin is not a terminal by default."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hcrepo", *args], env={**clean, **(env or {})}, cwd=ROOT,
        stdin=stdin, capture_output=True, text=True, timeout=120, check=False,
    )


def assert_one_line(text: str, *, starts: str, contains: str = "") -> None:
    """`text` is exactly one line (no traceback) starting with `starts`, holding `contains`."""
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert text.startswith(starts), text
    assert contains in text, text
    assert "Traceback" not in text
