"""`hcrepo check` against live databases: clean on the migrated schema, loud on drift."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from pydantic import BaseModel

from hcrepo import Repository, cached, query
from hcrepo.admin import migrate
from hcrepo.admin.check import Finding, repositories, run_check
from hcrepo.healthcare import PatientRepository, PrescriptionRepository, ProviderRepository
from hcrepo.shipped import shipped_dir
from tests.plugins.database import Database as ServerDatabase
from tests.plugins.database import FreshDatabase, migrate_database

ROOT = Path(__file__).resolve().parents[1]
SQL = Path(__file__).parent / "sql" / "check.sql"


class Named(BaseModel):
    id: UUID
    name: str


class ClinicZone(BaseModel):
    id: UUID
    name: str
    timezone: str


class Lint(Repository, sql="sql/check.sql", tenant=False):
    @query("select_star")
    def select_star(self, *, limit: int) -> list[Named]: ...

    @query("list_without_limit")
    def list_without_limit(self) -> list[Named]: ...

    @query("stream_without_limit")
    def stream_without_limit(self) -> Iterator[Named]: ...

    @query("scalar_of_the_wrong_type")
    def scalar_of_the_wrong_type(self, *, id: UUID) -> int: ...

    @query("delete_without_privilege")
    def delete_without_privilege(self, *, id: UUID) -> int: ...

    @query("missing_column")
    def missing_column(self) -> list[Named]: ...

    @query("model_mismatch")
    def model_mismatch(self) -> ClinicZone | None: ...

    @query("parameter_of_the_wrong_type")
    def parameter_of_the_wrong_type(self, *, id: int) -> Named | None: ...

    @query("tenant_table_without_tenant")
    def tenant_table_without_tenant(self) -> int: ...


class LintSubclass(Lint):
    """Found by the recursive walk, but has no plans of its own to check twice."""


class NestedLint(LintSubclass, sql="sql/check.sql"):
    @query("list_without_limit")
    def again(self) -> list[Named]: ...


def check_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`hcrepo check` as a user runs it: its own process (only hcrepo's repositories loaded
    unless --module says otherwise) and a clean environment."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hcrepo", "check", *args], env={**clean, **(env or {})},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def shipped() -> list[type[Repository]]:
    return [cls for cls in repositories() if cls.__module__.startswith("hcrepo.")]


def line_of(text: str) -> int:
    return SQL.read_text().splitlines().index(text) + 1


def messages(findings: list[Finding], severity: str = "error") -> list[str]:
    return [f.message for f in findings if f.severity == severity]


def test_discovery_walks_subclasses_recursively() -> None:
    found = repositories()
    assert Lint in found and NestedLint in found and LintSubclass not in found
    assert PatientRepository in found


def test_the_shipped_repositories_check_clean(migrated_db: ServerDatabase) -> None:
    assert [str(f) for f in run_check(migrated_db.app_url, shipped())] == []


def test_lints_and_mismatches(migrated_db: ServerDatabase) -> None:
    findings = run_check(migrated_db.app_url, [Lint])
    by_query = {f.message.split(":")[0].split(".")[1]: f for f in findings}
    errors, warnings = messages(findings), messages(findings, "warning")
    assert "Lint.select_star: SELECT * (the result changes when the table does; name columns)" \
        in warnings
    assert any(m.startswith("Lint.select_star: column specialty is not a field of Named")
               for m in errors)
    assert "Lint.list_without_limit: list query without LIMIT: add LIMIT :limit or return an " \
        "Iterator" in warnings
    assert not any("stream_without_limit" in m for m in errors + warnings)
    assert "Lint.scalar_of_the_wrong_type: column name is text (str) but the int result is int" \
        in errors
    assert "Lint.delete_without_privilege: the connected role has no DELETE privilege on " \
        "patients" in errors
    assert "Lint.model_mismatch: column zone is not a field of ClinicZone" in errors
    assert "Lint.model_mismatch: ClinicZone.timezone has no column in the result" in errors
    assert "Lint.parameter_of_the_wrong_type: parameter :id is uuid (UUID) but the signature " \
        "says int" in warnings
    assert "Lint.tenant_table_without_tenant: uses tenant table patients but the repository " \
        "is tenant=False: calls without a clinic see no rows" in warnings
    # A statement that does not prepare is reported at the line PostgreSQL points at.
    missing = by_query["missing_column"]
    assert missing.message == (
        'Lint.missing_column: does not prepare: 42703 column "no_such_column" does not exist')
    assert (missing.path, missing.line) == (str(SQL.resolve()), line_of("       no_such_column"))
    assert by_query["select_star"].line == line_of("-- name: select_star")


def test_superuser_connection_is_flagged(migrated_db: ServerDatabase) -> None:
    findings = run_check(migrated_db.superuser_url, [PatientRepository])
    assert [(f.path, f.severity) for f in findings] == [("<database>", "warning")]
    assert "bypasses row-level security" in findings[0].message


@pytest.fixture
def drifted(fresh_database: FreshDatabase) -> ServerDatabase:
    db = fresh_database()
    migrate_database(db)
    return db


def test_a_renamed_column_fails_the_check(drifted: ServerDatabase, tmp_path: Path) -> None:
    source = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), source)
    (source / "9999_rename_phone.sql").write_text(
        "-- depends: \nALTER TABLE patients RENAME COLUMN phone TO phone_number;\n"
    )
    assert migrate.apply(drifted.owner_url, setting="owner URL", source=source) == [
        "9999_rename_phone"]

    findings = run_check(drifted.app_url, shipped())
    errors = [f for f in findings if f.severity == "error"]
    patients_sql = shipped_dir("sql") / "patients.sql"
    # Each query using the column of the table fails at the first line that names it; the
    # reads through the patient_records view go on working (a view binds columns by number).
    direct = {plan.name for plan in PatientRepository.__plans__.values()
              if "patients" in plan.query.tables}
    first_use: dict[str, int] = {}
    block = ""
    for number, text in enumerate(patients_sql.read_text().splitlines(), start=1):
        block = text.removeprefix("-- name: ") if text.startswith("-- name: ") else block
        if "phone" in text and block in direct:
            first_use.setdefault(block, number)
    assert len(first_use) == 2
    assert sorted(f.line for f in errors) == sorted(first_use.values())
    assert {f.path for f in errors} == {str(patients_sql)}
    assert all(f.message.endswith(('column "phone" does not exist',
                                   'column "phone" of relation "patients" does not exist'))
               for f in errors)

    result = check_cli("--database", drifted.app_url)
    assert result.returncode == 1
    assert f"sql/patients.sql:{first_use['update_patient_contact']}: error: " \
        "PatientRepository.update_contact: does not prepare: 42703 column \"phone\" of " \
        'relation "patients" does not exist' in result.stdout.splitlines()


def test_schema_drift_in_types_nullability_and_row_level_security(
    drifted: ServerDatabase,
) -> None:
    with psycopg.connect(drifted.owner_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE prescriptions NO FORCE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE patients ALTER COLUMN mrn DROP NOT NULL")
        conn.execute("ALTER TABLE patients NO FORCE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE providers ALTER COLUMN npi TYPE bigint USING npi::bigint")
    findings = run_check(drifted.app_url, [PrescriptionRepository, PatientRepository,
                                           ProviderRepository])
    errors = messages(findings)
    # Seen through the patient_records view that PatientRepository.get reads.
    assert "PatientRepository.get: tenant table patients does not force row level " \
        "security (its owner bypasses the policies)" in errors
    assert "PrescriptionRepository.get: tenant table prescriptions does not force row level " \
        "security (its owner bypasses the policies)" in errors
    assert "PatientRepository.timeline: tenant table prescriptions does not force row level " \
        "security (its owner bypasses the policies)" in errors
    assert "PatientRepository.get: column mrn (patients.mrn) may be NULL but Patient.mrn is " \
        "not Optional" in errors
    assert "ProviderRepository.get: column npi is bigint (int) but Provider.npi is str | None" \
        in errors
    with psycopg.connect(drifted.owner_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE prescriptions DISABLE ROW LEVEL SECURITY")
    errors = messages(run_check(drifted.app_url, [PrescriptionRepository]))
    assert "PrescriptionRepository.get: tenant table prescriptions does not enable row level " \
        "security" in errors


def test_a_policy_reading_the_actor_fails_queries_cached_independent_of_it(
    drifted: ServerDatabase,
) -> None:
    assert messages(run_check(drifted.app_url, [PatientRepository])) == []
    with psycopg.connect(drifted.owner_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE patients ADD COLUMN created_by uuid")
        conn.execute("CREATE POLICY seen_by_their_actor ON patients AS RESTRICTIVE FOR SELECT "
                     "USING (created_by = NULLIF(current_setting('app.actor_id', true), '')"
                     "::uuid)")
    findings = [f for f in run_check(drifted.app_url, [PatientRepository, ProviderRepository])
                if f.severity == "error"]
    get_patient = next(q for q in PatientRepository.__plans__.values() if q.name == "get_patient")
    assert [(f.path, f.line, f.message) for f in findings] == [(
        get_patient.query.path, get_patient.query.line,
        "PatientRepository.get: @cached(independent_of='actor_id') but policy "
        "seen_by_their_actor on patients reads app.actor_id: its cached results would be "
        "shared across actor_ids",
    )]  # only the cached read declared independent; providers' policies do not read it


class RoleBlindPatients(Repository, sql="sql/cache.sql"):
    @query("cache_patient_count")
    @cached(ttl=60, independent_of=("role",))
    def count(self) -> int: ...


def test_a_query_on_role_shaped_tables_cannot_be_cached_independent_of_the_role(
    migrated_db: ServerDatabase,
) -> None:
    """The role policies read app.role through hcrepo_scope_role(): a count shared across
    roles would show a receptionist what only clinicians may count."""
    assert any("@cached(independent_of='role') but policy patients_role_select on patients "
               "reads app.role" in message
               for message in messages(run_check(migrated_db.app_url, [RoleBlindPatients])))


def test_the_command_exits_zero_on_a_clean_database(migrated_db: ServerDatabase) -> None:
    result = check_cli(env={"DATABASE_URL": migrated_db.app_url})
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr.endswith(" queries, 0 errors, 0 warnings\n")


def test_the_command_checks_the_modules_it_is_given(migrated_db: ServerDatabase) -> None:
    result = check_cli("--database", migrated_db.app_url, "--module", "tests.test_check")
    assert result.returncode == 1
    assert "tests/sql/check.sql:" in result.stdout
    assert "sql/patients.sql" not in result.stdout


def test_the_command_names_the_setting_it_cannot_use() -> None:
    result = check_cli()
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "hcrepo: DATABASE_URL: is required but not set\n"
    result = check_cli("--database", "postgresql://app:s3cret@127.0.0.1:1/x")
    assert result.returncode == 2
    assert result.stderr.startswith("hcrepo: --database: cannot connect")
    assert "s3cret" not in result.stderr
    result = check_cli("--database", "postgresql:///x", "--module", "no.such.module")
    assert (result.returncode, result.stderr) == (
        2, "hcrepo: --module: cannot import no.such.module (No module named 'no')\n")
