"""The declared types reach callers: mypy --strict accepts tests/typing/usage_ok.py and
rejects each marked line of tests/typing/usage_bad.py (and nothing else there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = Path(__file__).parent / "typing"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)(  \[[a-z-]+\])?$")
EXPECTED = re.compile(r"\s# E: (?P<message>.*)$")


def test_types_flow_to_callers() -> None:
    files = [USAGE / "usage_ok.py", USAGE / "usage_bad.py"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-error-summary", "--show-absolute-path", *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    errors: dict[tuple[str, int], list[str]] = {}
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            key = (Path(match["path"]).name, int(match["line"]))
            errors.setdefault(key, []).append(match["message"])

    assert not [key for key in errors if key[0] == "usage_ok.py"], result.stdout
    expected = {
        ("usage_bad.py", number): found["message"]
        for number, text in enumerate(files[1].read_text().splitlines(), start=1)
        if (found := EXPECTED.search(text))
    }
    assert len(expected) == 10
    assert set(errors) == set(expected), result.stdout
    for key, message in expected.items():
        assert any(message in reported for reported in errors[key]), (key, errors[key])
