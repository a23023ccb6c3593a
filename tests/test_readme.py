"""The README's quickstart runs as written, against a migrated database as hcrepo_app."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.plugins.database import Database as ServerDatabase

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "the README has no quickstart code block"
    return found.group(1)


def test_the_readme_quickstart_runs_as_written(migrated_db: ServerDatabase) -> None:
    result = subprocess.run(
        [sys.executable, "-c", quickstart()],
        env={**os.environ, "DATABASE_URL": migrated_db.app_url, "READ_REPLICA_URLS": "",
             "REDIS_URL": ""},
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "1 patient found\n"
