"""`hcrepo keys {status,rotate,encrypt-existing}`: the keys of encrypted columns, as the
owner role (hcrepo.admin.rotation does the work)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from hcrepo.admin import check, rotation
from hcrepo.admin.connect import connect
from hcrepo.cli.check import DEFAULT_MODULES
from hcrepo.cli.migrate import migration_target, positive
from hcrepo.config import Settings
from hcrepo.crypto.keys import BLIND_INDEX_KEY, MASTER_KEY, MasterKeys
from hcrepo.errors import ConfigError
from hcrepo.sqlfile import Column

DESCRIPTION = """\
The keys of encrypted columns, as the owner role (HCREPO_OWNER_URL, or --database), with
HCREPO_MASTER_KEY set.

`rotate --master` re-wraps every data key under the current HCREPO_MASTER_KEY (put the new
key there and the old one in HCREPO_MASTER_KEY_PREVIOUS first; remove the old one once this
has run). `rotate --data` gives each clinic a new data key version and re-encrypts its
values in small batches while the application keeps reading and writing; run it again
after an interruption and it finishes what was left. `status` counts the values each data
key version still protects. `encrypt-existing` seals the plaintext SSNs the field-encryption
migration moved aside."""


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys_parser = commands.add_parser(
        "keys", help="data keys of encrypted columns: status and online rotation",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = keys_parser.add_subparsers(required=True, title="actions")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database", metavar="URL",
                        help="hcrepo_owner's URL (instead of HCREPO_OWNER_URL)")
    common.add_argument("--clinic", type=UUID, metavar="ID", help="only this clinic")
    common.add_argument("--module", action="append", default=[], metavar="NAME",
                        help="import NAME so that its encrypted columns count too (repeatable)")
    actions.add_parser(
        "status", parents=[common], help="values per data key version, per clinic",
    ).set_defaults(command=_status)
    rotate = actions.add_parser("rotate", parents=[common],
                                help="re-wrap data keys (--master) or add a data key version "
                                "and re-encrypt under it (--data)")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--master", action="store_true",
                       help="re-wrap every data key under the current HCREPO_MASTER_KEY")
    which.add_argument("--data", action="store_true",
                       help="a new data key version per clinic; values re-encrypted")
    rotate.add_argument("--batch", type=positive, default=500, metavar="N",
                        help="values per transaction (default 500)")
    rotate.set_defaults(command=_rotate)
    existing = actions.add_parser(
        "encrypt-existing", parents=[common],
        help="seal the plaintext SSNs the field-encryption migration moved aside",
        description="Seal each SSN waiting in patients_plaintext_ssn into its patient's row, "
        "with its blind index, and delete it there. Values that are not an SSN, or that "
        "another patient of the clinic already has, stay aside and are counted.",
    )
    existing.add_argument("--batch", type=positive, default=500, metavar="N",
                          help="values per transaction (default 500)")
    existing.set_defaults(command=_encrypt_existing)


def _status(args: argparse.Namespace) -> int:
    columns = encrypted_columns(args.module)
    url, setting = migration_target(args.database)
    found = rotation.status(_connector(url, setting), columns, args.clinic)
    names = [f"{c.table}.{c.column}" for c in columns]
    print("clinic                                version  state    master  " + "  ".join(names))
    for row in found:
        counts = "  ".join(str(row.values[c]).ljust(len(n)) for c, n in zip(columns, names,
                                                                              strict=True))
        print(f"{row.clinic_id}  {row.version:<7}  {row.state:<7}  {row.master_version:<6}  "
              f"{counts}".rstrip())
    return 0


def _rotate(args: argparse.Namespace) -> int:
    url, setting = migration_target(args.database)
    master = _master_keys(url)
    connector = _connector(url, setting)
    if args.master:
        count = rotation.rotate_master(connector, master, args.clinic)
        print(f"hcrepo keys: {count} data keys re-wrapped under master key version "
              f"{master.current_version}")
        return 0
    columns = encrypted_columns(args.module)
    with Progress(TextColumn("re-encrypting {task.description}"), BarColumn(),
                  MofNCompleteColumn(), transient=False) as bar:
        task = bar.add_task("values", total=None)

        def advanced(clinic_id: UUID, column: Column, count: int) -> None:
            bar.update(task, advance=count, description=f"{column.table}.{column.column}")

        count = rotation.rotate_data(connector, master, columns, only=args.clinic,
                                     batch=args.batch, progress=advanced)
    print(f"hcrepo keys: {count} values re-encrypted under new data key versions")
    return 0


def _encrypt_existing(args: argparse.Namespace) -> int:
    url, setting = migration_target(args.database)
    settings = Settings.load(database_url=url)
    master, blind = _master_keys(url), settings.blind_index()
    if blind is None:
        raise ConfigError(BLIND_INDEX_KEY, "is required to encrypt SSNs but not set")
    result = rotation.encrypt_existing(_connector(url, setting), master, blind,
                                       only=args.clinic, batch=args.batch)
    print(f"hcrepo keys: {result.encrypted} SSNs encrypted, {result.left_aside} left in "
          "patients_plaintext_ssn (not an SSN, or a duplicate in its clinic)")
    return 0


def encrypted_columns(modules: Sequence[str]) -> list[Column]:
    """Every column an imported repository declares `-- encrypt:`."""
    classes = check.repositories(DEFAULT_MODULES + tuple(modules))
    return sorted({column for cls in classes for plan in cls.__plans__.values()
                   for column in plan.query.encrypted})


def _master_keys(url: str) -> MasterKeys:
    settings = Settings.load(database_url=url)
    master = settings.master_keys()
    if master is None:
        raise ConfigError(MASTER_KEY, "is required to rotate keys but not set")
    return master


def _connector(url: str, setting: str) -> rotation.Connect:
    @contextmanager
    def opened() -> Iterator[psycopg.Connection[Any]]:
        with connect(url, setting, autocommit=True) as conn:
            yield conn

    return opened

