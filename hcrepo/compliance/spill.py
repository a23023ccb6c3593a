"""Spill files of the PHI access log: rows the primary could not take, kept on disk.

Each process appends to one file of its own (`access-<pid>-<random>.spill`, mode 0600: rows
hold patient ids) in a 0700 directory, one JSON line per row, fsynced per batch, and holds an
exclusive `flock` on it while it lives. A file whose lock can be taken belongs to no live
process (it exited or was killed), so any process writing to the same database may replay
it: the first line names that database (host:port/dbname), and files of other databases in
the same directory are left alone. A line cut short by a crash mid-append is skipped.

Replay is at least once: a process killed between the COMMIT of a replayed file's rows and
the file's removal replays them again at the next start (duplicate rows, never lost ones).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_SUFFIX = ".spill"
_VERSION = 1


class SpillFile:
    """One locked spill file: this process's, or one claimed from a process that is gone."""

    __slots__ = ("fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def lines(self) -> tuple[list[list[Any]], int]:
        """The rows it holds (after the header) and how many lines were torn."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        *complete, tail = data.split(b"\n")
        torn = 1 if tail else 0  # no newline yet: its append never finished
        rows: list[list[Any]] = []
        for line in complete[1:]:  # after the header
            try:
                rows.append(json.loads(line))
            except ValueError:
                torn += 1
        return rows, torn

    def remove(self) -> None:
        """Delete the file (its rows are in the database) and release the lock."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)

    def release(self) -> None:
        """Keep the file for a later replay; release the lock."""
        os.close(self.fd)


class Spill:
    """The spill directory of one access log (one database)."""

    def __init__(self, directory: str, target: str) -> None:
        self._dir = Path(directory)
        self._target = target
        self._own: SpillFile | None = None

    def append(self, rows: Sequence[Sequence[Any]]) -> None:
        """Append rows (JSON-ready sequences) to this process's file and fsync it."""
        own = self._own or self._create()
        data = b"".join(json.dumps(list(row), separators=(",", ":")).encode() + b"\n"
                        for row in rows)
        view = memoryview(data)
        while view:
            written = os.write(own.fd, view)
            view = view[written:]
        os.fsync(own.fd)

    def _create(self) -> SpillFile:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"access-{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        header = json.dumps({"version": _VERSION, "database": self._target}).encode() + b"\n"
        os.write(fd, header)
        os.fsync(fd)
        directory = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new name survives a crash too
        finally:
            os.close(directory)
        self._own = SpillFile(path, fd)
        return self._own

    def claim(self) -> Iterator[SpillFile]:
        """Files to write now: this process's (closed for appends: the next spill starts a
        new one), then every file of this database no live process holds."""
        own, self._own = self._own, None
        if own is not None:
            yield own
        if not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob(f"access-*{_SUFFIX}")):
            if own is not None and path == own.path:
                continue
            claimed = self._take(path)
            if claimed is not None:
                yield claimed

    def _take(self, path: Path) -> SpillFile | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Removed (and maybe re-created) by whoever replayed it while we opened it.
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
            with open(path, "rb") as header_file:
                header = json.loads(header_file.readline() or b"{}")
            if header.get("database") != self._target:
                raise LookupError(path)
        except (BlockingIOError, FileNotFoundError, LookupError, ValueError, OSError):
            os.close(fd)
            return None
        return SpillFile(path, fd)

    def close(self) -> None:
        """Stop appending to this process's file and release it: the next writer of this
        database (this process's or another's) replays it."""
        own, self._own = self._own, None
        if own is not None:
            own.release()

    def forget(self) -> None:
        """In a forked child: the parent keeps appending to its file; the child makes its own."""
        own, self._own = self._own, None
        if own is not None:
            os.close(own.fd)  # the parent's descriptor keeps the lock
