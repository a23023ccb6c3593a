"""Key rotation, online, as the owner role: `hcrepo keys rotate` and `hcrepo keys status`.

A master key rotation re-wraps every data key under the current master key version (the
data keys themselves, hence every stored value, stay as they are). A data key rotation adds
a version to a clinic's keys, makes it the one new values are sealed with, and re-encrypts
the clinic's values in batches: each batch is one short transaction that locks only its own
rows, so reads never wait and writes wait at most for one batch. Every version stays
readable throughout, so a row is readable before, during and after its batch, and after a
crash. Re-running finishes the job: while a clinic still has values under an older version
than its active one, a rotation resumes re-encrypting them instead of adding a version.

Every rotation is recorded per clinic in `key_rotations` (append-only): started, then
completed with the number of values re-encrypted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg import sql

from hcrepo.compliance import envelope
from hcrepo.compliance.keyring import StoredKey, new_data_key, wrap_context
from hcrepo.compliance.keys import MasterKeys
from hcrepo.errors import DecryptionFailed
from hcrepo.sqlfile import Column

Connect = Callable[[], Any]
"""A context manager factory of autocommit psycopg connections as the owner: every
transaction below is its own, and short."""
Progress = Callable[[UUID, Column, int], None]
"""Called after each committed batch: clinic, column, values in the batch."""


class VersionCount(NamedTuple):
    clinic_id: UUID
    version: int
    state: str
    master_version: int
    values: dict[Column, int]


def clinics(conn: psycopg.Connection[Any], only: UUID | None = None) -> list[UUID]:
    rows = conn.execute("SELECT id FROM clinics WHERE %s::uuid IS NULL OR id = %s ORDER BY id",
                        [only, only]).fetchall()
    return [row[0] for row in rows]


def _in_clinic(conn: psycopg.Connection[Any], clinic_id: UUID) -> None:
    conn.execute("SELECT set_config('app.clinic_id', %s, true)", [str(clinic_id)])


def _keys(conn: psycopg.Connection[Any], lock: bool = False) -> list[StoredKey]:
    rows = conn.execute(
        "SELECT version, master_version, wrapped, state = 'active' FROM clinic_data_keys "
        "ORDER BY version" + (" FOR UPDATE" if lock else "")
    ).fetchall()
    return [StoredKey(v, m, bytes(w), a) for v, m, w, a in rows]


def _version(column: Column) -> sql.Composed:
    return sql.SQL("split_part({}, ':', 2)::int").format(sql.Identifier(column.column))


def _record(conn: psycopg.Connection[Any], clinic_id: UUID, kind: str, event: str,
            from_version: int | None, to_version: int, values: int = 0) -> None:
    conn.execute(
        "INSERT INTO key_rotations (clinic_id, kind, event, from_version, to_version, "
        "values_reencrypted) VALUES (%s, %s, %s, %s, %s, %s)",
        [clinic_id, kind, event, from_version, to_version, values],
    )


def status(connect: Connect, columns: Sequence[Column], only: UUID | None = None
           ) -> list[VersionCount]:
    """Per clinic and data key version: its state, master key version, and how many values
    of each encrypted column it still protects."""
    found: list[VersionCount] = []
    with connect() as conn:
        for clinic_id in clinics(conn, only):
            with conn.transaction():
                _in_clinic(conn, clinic_id)
                counts: dict[tuple[int, Column], int] = {}
                for column in columns:
                    query = sql.SQL("SELECT {v}, count(*) FROM {t} WHERE {c} IS NOT NULL "
                                    "GROUP BY 1").format(
                        v=_version(column), t=sql.Identifier(column.table),
                        c=sql.Identifier(column.column))
                    for version, count in conn.execute(query).fetchall():
                        counts[(version, column)] = count
                keys = {k.version: k for k in _keys(conn)}
            for version in sorted(keys.keys() | {v for v, _ in counts}):
                key = keys.get(version)
                found.append(VersionCount(
                    clinic_id, version,
                    ("active" if key.active else "retired") if key else "missing",
                    key.master_version if key else 0,
                    {c: counts.get((version, c), 0) for c in columns}))
    return found


def rotate_master(connect: Connect, master: MasterKeys, only: UUID | None = None) -> int:
    """Re-wrap every data key not wrapped under the current master key version (one short
    transaction per clinic); how many were re-wrapped."""
    current = master.current_version
    done = 0
    with connect() as conn:
        for clinic_id in clinics(conn, only):
            with conn.transaction():
                _in_clinic(conn, clinic_id)
                stale = [k for k in _keys(conn, lock=True) if k.master_version != current]
                if not stale:
                    continue
                _record(conn, clinic_id, "master", "started",
                        min(k.master_version for k in stale), current)
                for key in stale:
                    context = wrap_context(clinic_id, key.version)
                    plain = master.unwrap(key.master_version, key.wrapped, context)
                    conn.execute(
                        "UPDATE clinic_data_keys SET wrapped = %s, master_version = %s "
                        "WHERE version = %s",
                        [master.wrap(plain, context), current, key.version])
                _record(conn, clinic_id, "master", "completed",
                        min(k.master_version for k in stale), current, len(stale))
                done += len(stale)
    return done


def rotate_data(
    connect: Connect,
    master: MasterKeys,
    columns: Sequence[Column],
    *,
    only: UUID | None = None,
    batch: int = 500,
    progress: Progress | None = None,
) -> int:
    """A new data key version per clinic (or the resumption of an unfinished rotation) and
    every value re-encrypted under it; how many values were re-encrypted."""
    total = 0
    with connect() as conn:
        for clinic_id in clinics(conn, only):
            total += _rotate_clinic(conn, master, columns, clinic_id, batch, progress)
    return total


def pending(conn: psycopg.Connection[Any], columns: Sequence[Column], active: int) -> int:
    """Values of the clinic in context sealed under another version than `active`."""
    count = 0
    for column in columns:
        query = sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS NOT NULL AND {v} <> %s").format(
            t=sql.Identifier(column.table), c=sql.Identifier(column.column), v=_version(column))
        row = conn.execute(query, [active]).fetchone()
        count += row[0] if row else 0
    return count


def _rotate_clinic(
    conn: psycopg.Connection[Any],
    master: MasterKeys,
    columns: Sequence[Column],
    clinic_id: UUID,
    batch: int,
    progress: Progress | None,
) -> int:
    with conn.transaction():
        _in_clinic(conn, clinic_id)
        stored = _keys(conn, lock=True)  # two rotations of one clinic run one after the other
        if not stored:
            return 0  # nothing was ever sealed for this clinic
        active = next(k.version for k in stored if k.active)
        if pending(conn, columns, active) == 0:
            # Nothing left from an earlier rotation: start a new one.
            target = max(k.version for k in stored) + 1
            conn.execute("UPDATE clinic_data_keys SET state = 'retired' WHERE state = 'active'")
            conn.execute(
                "INSERT INTO clinic_data_keys (clinic_id, version, master_version, wrapped, "
                "state) VALUES (%s, %s, %s, %s, 'active')",
                [clinic_id, target, master.current_version,
                 master.wrap(new_data_key(), wrap_context(clinic_id, target))])
            _record(conn, clinic_id, "data", "started", active, target)
        else:
            target = active  # resume: the new version exists, values remain under older ones
            _record(conn, clinic_id, "data", "started", None, target)
        keys = {k.version: master.unwrap(k.master_version, k.wrapped,
                                         wrap_context(clinic_id, k.version))
                for k in _keys(conn)}
    done = 0
    for column in columns:
        done += _reencrypt(conn, clinic_id, column, keys, target, batch, progress)
    with conn.transaction():
        _in_clinic(conn, clinic_id)
        _record(conn, clinic_id, "data", "completed", None, target, done)
    return done


def _reencrypt(
    conn: psycopg.Connection[Any],
    clinic_id: UUID,
    column: Column,
    keys: dict[int, bytes],
    target: int,
    batch: int,
    progress: Progress | None,
) -> int:
    where = f"{column.table}.{column.column} (key rotation)"
    select = sql.SQL(
        "SELECT id, {c} FROM {t} WHERE id > %s AND {c} IS NOT NULL AND {v} <> %s "
        "ORDER BY id LIMIT %s FOR UPDATE"
    ).format(c=sql.Identifier(column.column), t=sql.Identifier(column.table),
             v=_version(column))
    update = sql.SQL("UPDATE {t} SET {c} = %s WHERE id = %s AND {c} = %s").format(
        t=sql.Identifier(column.table), c=sql.Identifier(column.column))
    last = UUID(int=0)
    done = 0
    while True:
        with conn.transaction():
            _in_clinic(conn, clinic_id)
            rows = conn.execute(select, [last, target, batch]).fetchall()
            if not rows:
                return done
            changes = []
            for row_id, sealed in rows:
                aad = envelope.associated_data(clinic_id, column.table, column.column, row_id)
                version = envelope.key_version(sealed, where)
                if version not in keys:
                    raise DecryptionFailed(
                        f"{where}: a value is sealed with data key version {version}, "
                        "which this clinic does not have")
                plain = envelope.open_sealed(keys[version], sealed, aad, where)
                changes.append((envelope.seal(keys[target], target, plain, aad), row_id, sealed))
            with conn.cursor() as cursor:
                cursor.executemany(update, changes)
            last = rows[-1][0]
        done += len(rows)
        if progress is not None:
            progress(clinic_id, column, len(rows))
