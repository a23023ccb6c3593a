"""What a cached query promises, checked when its class is defined (no servers): the policy
inputs every key carries."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from hcrepo import Repository, SqlFileError, cached, execution, query
from hcrepo.tenancy import POLICY_INPUTS, Context

CACHE_SQL = Path(__file__).parent / "sql" / "cache.sql"


def sql_line(name: str) -> int:
    return CACHE_SQL.read_text().splitlines().index(f"-- name: {name}") + 1


def refusal(**methods: Any) -> str:
    """The SqlFileError text of defining a repository over tests/sql/cache.sql."""
    with pytest.raises(SqlFileError) as caught:
        type("Refused", (Repository,), {"__module__": __name__, **methods}, sql=str(CACHE_SQL))
    return str(caught.value)


# --- policy inputs ------------------------------------------------------------------------


def test_the_context_statement_sends_exactly_the_policy_inputs() -> None:
    """POLICY_INPUTS is what keys are built from; the statement is what row-level security
    sees. Each `app.<name>` setting must carry the Context field of that name."""
    context = Context(clinic_id=uuid.uuid4(), actor_id=uuid.uuid4())
    for statement in (execution.context_statement(context),
                      execution.context_statement(context, 5000)):
        settings = re.findall(r"set_config\('([^']+)', \$(\d+), true\)", statement.sql)
        sent = {name.removeprefix("app."): int(index) for name, index in settings
                if name.startswith("app.")}
        assert sorted(sent) == sorted(POLICY_INPUTS)
        for name, index in sent.items():
            assert statement.params[index - 1] == str(getattr(context, name))


def test_independence_is_declared_only_of_policy_inputs_other_than_the_clinic() -> None:
    def count(self: Any) -> int: ...

    for name in ("role", "clinic_id"):
        message = refusal(count=query("cache_patient_count")(
            cached(ttl=60, independent_of=(name,))(count)))
        assert message.startswith(f"{CACHE_SQL}:{sql_line('cache_patient_count')} ")
        assert f"independent_of names {name!r}; it may name only 'actor_id'" in message
        assert f"{Path(__file__).resolve()}:" in message  # where the method is declared


def test_sql_that_reads_a_setting_cannot_declare_independence_of_it() -> None:
    def actor(self: Any) -> str: ...

    message = refusal(actor=query("cache_actor_setting")(
        cached(ttl=60, independent_of=("actor_id",))(actor)))
    assert message.startswith(f"{CACHE_SQL}:{sql_line('cache_actor_setting')} ")
    assert message.endswith("independent_of='actor_id' but the SQL reads app.actor_id")
