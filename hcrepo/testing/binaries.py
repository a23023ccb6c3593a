"""Where the PostgreSQL and Redis server binaries of this machine are."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hcrepo.testing.errors import EmbeddedServerError

MIN_PG_MAJOR = 14
PG_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def _pg_major(bindir: Path) -> int | None:
    """Major version of the `postgres` binary in `bindir`, or None when unusable."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(found.group(1)) if found else None


def _bindir_candidates() -> Iterator[Path]:
    on_path = shutil.which("initdb")
    if on_path:
        # A PATH entry may hold only symlinks to some of the binaries (/usr/local/bin here).
        yield Path(on_path).parent
        yield Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            if out:
                yield Path(out)

    def version_key(path: Path) -> tuple[int, str]:
        major = path.parent.name
        return (int(major) if major.isdigit() else -1, major)

    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)


@functools.cache
def pg_bindir() -> Path:
    """Directory holding initdb, pg_ctl, pg_basebackup and postgres of version >= 14.

    Looked for on PATH, then at `pg_config --bindir`, then in the highest
    /usr/lib/postgresql/*/bin.
    """
    seen: set[Path] = set()
    for candidate in _bindir_candidates():
        if candidate in seen:
            continue
        seen.add(candidate)
        if not all(os.access(candidate / name, os.X_OK) for name in PG_BINARIES):
            continue
        major = _pg_major(candidate)
        if major is not None and major >= MIN_PG_MAJOR:
            return candidate
    raise EmbeddedServerError(
        f"no PostgreSQL >= {MIN_PG_MAJOR} server binaries ({', '.join(PG_BINARIES)}) on PATH, "
        "at pg_config --bindir or in /usr/lib/postgresql/*/bin: "
        "install postgresql (scripts/ensure-system-deps.sh does it)"
    )


def redis_binary(name: str) -> str:
    """Path of redis-server or redis-cli on PATH."""
    path = shutil.which(name)
    if path is None:
        raise EmbeddedServerError(f"{name} not found on PATH: install redis-server")
    return path
