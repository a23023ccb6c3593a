"""`hcrepo demo`: runs from a clean environment, shows isolation, leaves nothing behind."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hcrepo.cli import demo

ROOT = Path(__file__).resolve().parents[1]
# Modules a production command must not load: the throw-away servers and their extra.
_TESTING_MODULES = (
    "sorted(m for m in sys.modules if m.startswith('hcrepo.testing')"
    " or m.partition('.')[0] in ('pytest', '_pytest', 'pytest_postgresql'))"
)


def _python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp dir of the demo's own (other runs may share /tmp), reachable by the server user."""
    path = Path(tempfile.mkdtemp(prefix="hcrepo-demo-test-"))
    path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_exits_0_and_shows_each_clinic_only_its_patients(scratch: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hcrepo", "demo"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
             "TMPDIR": str(scratch)},
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    out = result.stdout
    assert "Demo Clinic North sees 3 patients: N-0001, N-0002, N-0003\n" in out
    assert "Demo Clinic South sees 2 patients: S-0001, S-0002\n" in out
    assert "no clinic context: refused by hcrepo before any round trip\n" in out
    assert "North writing a patient into South: refused by row-level security" in out
    assert "replica replay paused: sees the new phone" in out
    assert "another patient read three times: 2 served from Redis" in out
    assert "overlapping booking for the same provider: refused" in out
    assert "receptionist: patient demographics shown, clinical note refused\n" in out
    assert "receptionist claiming a doctor's role: refused by PostgreSQL (42501)\n" in out
    assert ("nurse, another clinician's draft note: hidden\n"
            "alert hook: break-glass by a nurse recorded in audit.emergency_access\n"
            "nurse breaking the glass: the draft note is shown\n") in out
    assert "a patient printed: PatientSummary(id=UUID(" in out and "first_name='***'" in out
    assert "its attribute patient.mrn: N-0002\n" in out
    assert "SSN stored encrypted: the superuser reads hc1:1:" in out
    assert "(not the SSN)\n" in out
    assert "through the blind index: E-0001 (decrypted for the doctor: the same SSN)\n" in out
    assert demo.DEMO_SSN not in out and demo.DEMO_SSN[-4:] not in out
    assert " clinic chains, verified; trail of N-0001 as hcrepo_auditor:\n" in out
    assert "  changed update patients [phone, updated_at] by " in out
    # MRNs only: names and birth dates are PHI, even fake ones.
    for _mrn, first, last, born, _sex in (p for ps in demo.CLINICS.values() for p in ps):
        assert first not in out and last not in out and born not in out
    assert list(scratch.iterdir()) == []


class _BrokenOutput(io.StringIO):
    """Fails on the second line written, after the server has started."""

    def write(self, text: str) -> int:
        if self.getvalue():
            raise BrokenPipeError("reader went away")
        return super().write(text)


def test_demo_removes_its_server_when_it_fails(scratch: Path) -> None:
    out = _BrokenOutput()
    with pytest.raises(BrokenPipeError):
        demo.run(out)
    assert list(scratch.iterdir()) == []
    port = int(out.getvalue().rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nobody listens there any more


def test_demo_without_the_testing_extra_says_how_to_get_it_and_exits_2() -> None:
    result = _python(
        "import sys\n"
        "sys.modules['pytest_postgresql'] = None  # the testing extra is not installed\n"
        "from hcrepo.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    assert (result.returncode, result.stdout) == (2, "")  # no server was started
    assert result.stderr.splitlines() == [f"hcrepo: {demo.MISSING_EXTRA}"]
    assert "pip install 'hcrepo[testing]'" in result.stderr


def test_the_cli_and_migrate_help_do_not_load_the_throw_away_servers() -> None:
    result = _python(
        "import sys\n"
        "import hcrepo.cli\n"
        f"after_import = {_TESTING_MODULES}\n"
        "try:\n"
        "    hcrepo.cli.main(['migrate', '--help'])\n"
        "except SystemExit as exit:\n"
        f"    print(repr((exit.code, after_import, {_TESTING_MODULES})), file=sys.stderr)\n"
    )
    assert result.stderr == "(0, [], [])\n"
    assert "apply" in result.stdout  # the help was printed
