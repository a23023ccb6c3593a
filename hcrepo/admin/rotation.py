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

from hcrepo.crypto import envelope
from hcrepo.crypto.blind_index import NORMALISERS, BlindIndex
from hcrepo.crypto.keyring import StoredKey, new_data_key, wrap_context
from hcrepo.crypto.keys import MasterKeys
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


def _add_version(conn: psycopg.Connection[Any], master: MasterKeys, clinic_id: UUID,
                 version: int) -> None:
    """A new data key, active from now on (the caller retired the previous one)."""
    conn.execute(
        "INSERT INTO clinic_data_keys (clinic_id, version, master_version, wrapped, state) "
        "VALUES (%s, %s, %s, %s, 'active')",
        [clinic_id, version, master.current_version,
         master.wrap(new_data_key(), wrap_context(clinic_id, version))])


def _unwrapped(conn: psycopg.Connection[Any], master: MasterKeys, clinic_id: UUID
               ) -> dict[int, bytes]:
    return {k.version: master.unwrap(k.master_version, k.wrapped,
                                     wrap_context(clinic_id, k.version))
            for k in _keys(conn)}


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
            _add_version(conn, master, clinic_id, target)
            _record(conn, clinic_id, "data", "started", active, target)
        else:
            target = active  # resume: the new version exists, values remain under older ones
            _record(conn, clinic_id, "data", "started", None, target)
        keys = _unwrapped(conn, master, clinic_id)
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
                version, raw = envelope.parse(sealed, where)
                if version not in keys:
                    raise DecryptionFailed(
                        f"{where}: a value is sealed with data key version {version}, "
                        "which this clinic does not have")
                plain = envelope.decrypt(keys[version], raw, aad, where)
                changes.append((envelope.seal(keys[target], target, plain, aad), row_id, sealed))
            with conn.cursor() as cursor:
                cursor.executemany(update, changes)
            last = rows[-1][0]
        done += len(rows)
        if progress is not None:
            progress(clinic_id, column, len(rows))


class Leftover(NamedTuple):
    encrypted: int
    left_aside: int
    """Values still waiting: not an SSN (digits, spaces, dashes), or another patient of
    the clinic has it (the blind index is unique)."""


def encrypt_existing(
    connect: Connect,
    master: MasterKeys,
    blind: BlindIndex,
    *,
    only: UUID | None = None,
    batch: int = 500,
    progress: Progress | None = None,
) -> Leftover:
    """Seal the plaintext SSNs 0008_field_encryption moved aside into their rows (with their
    blind index) and delete them from `patients_plaintext_ssn`, in short batches."""
    column = Column("patients", "ssn")
    done = skipped = 0
    with connect() as conn:
        for clinic_id in clinics(conn, only):
            with conn.transaction():
                _in_clinic(conn, clinic_id)
                stored = _keys(conn, lock=True)
                if not stored:
                    _add_version(conn, master, clinic_id, 1)
                    stored = _keys(conn)
                active = next(k.version for k in stored if k.active)
                keys = _unwrapped(conn, master, clinic_id)
            last = UUID(int=0)
            while True:
                with conn.transaction():
                    _in_clinic(conn, clinic_id)
                    rows = conn.execute(
                        "SELECT patient_id, ssn FROM patients_plaintext_ssn "
                        "WHERE patient_id > %s ORDER BY patient_id LIMIT %s FOR UPDATE",
                        [last, batch]).fetchall()
                    if not rows:
                        break
                    for patient_id, plain in rows:
                        digits = NORMALISERS["digits"](plain)
                        if digits is None or not _seal_into_row(
                                conn, clinic_id, column, patient_id, plain, digits,
                                keys[active], active, blind):
                            skipped += 1
                            continue
                        done += 1
                    last = rows[-1][0]
                if progress is not None:
                    progress(clinic_id, column, len(rows))
    return Leftover(done, skipped)


def _seal_into_row(conn: psycopg.Connection[Any], clinic_id: UUID, column: Column,
                   patient_id: UUID, plain: str, digits: str, key: bytes, version: int,
                   blind: BlindIndex) -> bool:
    aad = envelope.associated_data(clinic_id, column.table, column.column, patient_id)
    try:
        with conn.transaction():  # a savepoint: a duplicate leaves only this row aside
            conn.execute(
                "UPDATE patients SET ssn = %s, ssn_bidx = %s WHERE id = %s AND ssn IS NULL",
                [envelope.seal(key, version, plain, aad),
                 blind.index(clinic_id, column.table, column.column, digits), patient_id])
            conn.execute("DELETE FROM patients_plaintext_ssn WHERE patient_id = %s",
                         [patient_id])
    except psycopg.errors.UniqueViolation:
        return False
    return True
