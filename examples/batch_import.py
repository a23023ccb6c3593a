"""Import a CSV of patients into one clinic through the healthcare repositories.

    DATABASE_URL=... python examples/batch_import.py --clinic UUID --actor UUID patients.csv

The header names the arguments of `PatientRepository.create`: mrn, first_name, last_name,
date_of_birth (YYYY-MM-DD), sex (female, male, other, unknown) are required; phone, email,
address, ssn are optional (an empty cell is no value). Rows are written in units of work of
`--batch-size` rows (retried as a whole on a serialization failure or deadlock); each row
runs in a savepoint of its unit, so a row the database refuses (an MRN the clinic already
has, say) is reported and the good rows around it are kept. Rows that cannot be valid are
refused before anything is sent.

The summary names a bad row by its line in the file and a reason: a column and what is
wrong with it, never the cell's value (it is PHI). Exit code 0 when every row was imported,
1 when some were rejected, 2 on bad arguments or a file that is not a patient CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console
from rich.progress import Progress

from hcrepo import ConfigError, Database, DatabaseError, UniqueViolation, UnitOfWork
from hcrepo.healthcare import PatientRepository, Sex


class NewPatient(BaseModel):
    """One row as `PatientRepository.create` takes it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    mrn: str
    first_name: str
    last_name: str
    date_of_birth: date
    sex: Sex
    phone: str | None = None
    email: str | None = None
    address: str | None = None
    ssn: str | None = None


COLUMNS = tuple(NewPatient.model_fields)
REQUIRED = tuple(name for name, field in NewPatient.model_fields.items() if field.is_required())


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


@dataclass(frozen=True)
class Row:
    line: int
    patient: NewPatient


class BadInput(Exception):
    """The arguments or the file's header are wrong: nothing is imported (exit 2)."""


def validation_reason(error: ValidationError) -> str:
    """The column and the kind of problem of each error, without the input."""
    reasons = []
    for item in error.errors(include_input=False, include_url=False):
        column = ".".join(str(part) for part in item["loc"]) or "row"
        problem = "missing" if item["type"] == "missing" else item["msg"]
        reasons.append(f"{column}: {problem}")
    return "; ".join(reasons)


def parse(line: int, cells: dict[str | Any, Any]) -> Row | Rejected:
    """A row of the file, or why it cannot be imported. Empty cells are no value."""
    if None in cells:
        return Rejected(line, "more cells than the header has columns")
    values = {name: value for name, value in cells.items() if value not in ("", None)}
    try:
        return Row(line, NewPatient.model_validate(values))
    except ValidationError as error:
        return Rejected(line, validation_reason(error))


def read_rows(path: Path) -> Iterator[Row | Rejected]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames or []
        unknown = sorted(set(header) - set(COLUMNS))
        missing = [name for name in REQUIRED if name not in header]
        if unknown or missing:
            raise BadInput(f"{path.name}: the header must name {', '.join(REQUIRED)} (and "
                           f"may name {', '.join(c for c in COLUMNS if c not in REQUIRED)}); "
                           f"unknown: {', '.join(unknown) or 'none'}, "
                           f"missing: {', '.join(missing) or 'none'}")
        for cells in reader:
            yield parse(reader.line_num, cells)


def count_records(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as file:
        return max(sum(1 for _ in csv.reader(file)) - 1, 0)


def import_batch(uow: UnitOfWork, rows: Sequence[Row]) -> list[Rejected]:
    """Create `rows` in one unit of work, each in a savepoint: a refused row is rolled back
    alone. Run by `db.transaction`, which re-runs it whole on a retryable error."""
    patients = PatientRepository(uow)
    rejected = []
    for row in rows:
        try:
            with uow.savepoint():
                patients.create(**row.patient.model_dump())
        except UniqueViolation as error:
            # The SSN is unique per clinic through its blind index (patients_clinic_ssn_bidx_key).
            what = "ssn: another patient has this SSN" if "ssn" in (error.constraint or "") \
                else "mrn: the clinic already has this MRN"
            rejected.append(Rejected(row.line, what))
        except TypeError:  # hcrepo names the argument, never the value
            rejected.append(Rejected(row.line, "ssn: digits, spaces and dashes only"))
        except DatabaseError as error:
            rejected.append(Rejected(row.line, f"refused by the database ({error.sqlstate})"))
    return rejected


def batches(rows: Iterator[Row | Rejected], size: int,
            rejected: list[Rejected]) -> Iterator[list[Row]]:
    """Valid rows in lists of `size`; invalid ones go to `rejected` as they are read."""
    batch: list[Row] = []
    for row in rows:
        if isinstance(row, Rejected):
            rejected.append(row)
            continue
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_import(db: Database, path: Path, clinic_id: UUID, actor_id: UUID,
               batch_size: int, console: Console) -> tuple[int, list[Rejected]]:
    """(rows imported, rows rejected), with a progress bar on `console`."""
    rejected: list[Rejected] = []
    imported = 0
    rows = read_rows(path)
    with db.context(clinic_id=clinic_id, actor_id=actor_id), \
            Progress(console=console, transient=False) as progress:
        task = progress.add_task("importing patients", total=count_records(path))
        for batch in batches(rows, batch_size, rejected):
            refused = db.transaction(import_batch, rows=batch)
            rejected.extend(refused)
            imported += len(batch) - len(refused)
            progress.update(task, completed=imported + len(rejected))
        progress.update(task, completed=imported + len(rejected))
    return imported, sorted(rejected, key=lambda r: r.line)


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("csv", type=Path, help="the CSV file (UTF-8, header row first)")
    parser.add_argument("--clinic", type=UUID, required=True, help="the clinic's id")
    parser.add_argument("--actor", type=UUID, required=True,
                        help="the staff member the import is recorded for")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="rows per unit of work (default 250)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not args.csv.is_file():
        parser.error(f"{args.csv.name}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    console = Console(stderr=True)
    try:
        with Database.from_env() as db:
            imported, rejected = run_import(db, args.csv, args.clinic, args.actor,
                                            args.batch_size, console)
    except (BadInput, ConfigError) as exc:
        print(f"batch_import: {exc}", file=sys.stderr)
        return 2
    except (UnicodeDecodeError, csv.Error):
        # Their messages quote the offending bytes: name the file, not its content.
        print(f"batch_import: {args.csv.name} is not UTF-8 CSV from the line the import "
              "stopped at; the batches before it were imported", file=sys.stderr)
        return 2
    print(f"imported {imported} patients, rejected {len(rejected)} rows")
    for row in rejected:
        print(f"line {row.line}: {row.reason}")
    return 1 if rejected else 0


if __name__ == "__main__":
    sys.exit(main())
