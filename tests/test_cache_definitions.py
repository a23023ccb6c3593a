"""What a cached or invalidating query promises, checked when its class is defined or its
method bound (no servers): the policy inputs every key carries, tag templates that cannot
fail after a write committed, arguments converted to their declared types, and keys that
tell a record (tuple) from an array (list)."""

from __future__ import annotations

import enum
import re
import uuid
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from hcrepo import Repository, SqlFileError, cached, execution, query
from hcrepo.cache.keys import KeyMaker
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
    context = Context(clinic_id=uuid.uuid4(), actor_id=uuid.uuid4(), role="nurse",
                      emergency_reason="why", emergency_access_id=uuid.uuid4())
    for statement in (execution.context_statement(context),
                      execution.context_statement(context, 5000)):
        settings = re.findall(r"set_config\('([^']+)', \$(\d+), true\)", statement.sql)
        sent = {name.removeprefix("app."): int(index) for name, index in settings
                if name.startswith("app.")}
        # The reason travels too, but a policy accepts it only with the recorded row whose
        # id (a policy input) fixes it: the id keys the cache for both.
        assert sorted(sent) == sorted((*POLICY_INPUTS, "emergency_reason"))
        for name, index in sent.items():
            assert statement.params[index - 1] == str(getattr(context, name))


def test_independence_is_declared_only_of_policy_inputs_other_than_the_clinic() -> None:
    def count(self: Any) -> int: ...

    for name in ("emergency_access_id", "emergency_reason", "clinic_id"):
        message = refusal(count=query("cache_patient_count")(
            cached(ttl=60, independent_of=(name,))(count)))
        assert message.startswith(f"{CACHE_SQL}:{sql_line('cache_patient_count')} ")
        assert f"independent_of names {name!r}; it may name only 'actor_id', 'role'" in message
        assert f"{Path(__file__).resolve()}:" in message  # where the method is declared


def test_sql_that_reads_a_setting_cannot_declare_independence_of_it() -> None:
    def actor(self: Any) -> str: ...

    message = refusal(actor=query("cache_actor_setting")(
        cached(ttl=60, independent_of=("actor_id",))(actor)))
    assert message.startswith(f"{CACHE_SQL}:{sql_line('cache_actor_setting')} ")
    assert message.endswith("independent_of='actor_id' but the SQL reads app.actor_id")


# --- tag templates ------------------------------------------------------------------------


def test_a_tag_that_cannot_format_is_refused_before_any_write_can_commit() -> None:
    """`day:{day:%Y-%m-%d}` on a `str` day used to commit the write, then raise ValueError
    with the cache never invalidated."""

    def set_birth_date(self: Any, *, id: UUID, day: str) -> int: ...

    message = refusal(set_birth_date=query(
        "cache_set_birth_date", invalidates=["day:{day:%Y-%m-%d}"])(set_birth_date))
    assert message.startswith(f"{CACHE_SQL}:{sql_line('cache_set_birth_date')} ")
    assert message.endswith("tag 'day:{day:%Y-%m-%d}' cannot be formatted when day is a str")

    def patient(self: Any, *, id: int | UUID) -> None: ...

    message = refusal(patient=query("cache_patient")(
        cached(ttl=60, tags=["patient:{id:08d}"])(patient)))  # int formats; a UUID does not
    assert message.endswith("tag 'patient:{id:08d}' cannot be formatted when id is a UUID")
    message = refusal(patient=query("cache_patient")(cached(ttl=60, tags=["p:{id"])(patient)))
    assert message.endswith("tag 'p:{id' is not a valid format string")


class Kind(enum.Enum):
    A = "a"


def test_templates_that_format_for_every_declared_type_are_accepted() -> None:
    class Accepted(Repository, sql="sql/cache.sql"):
        @query("cache_set_birth_date", invalidates=["day:{day:%Y-%m-%d}", "p:{id}"])
        def set_birth_date(self, *, id: UUID, day: date | None) -> int: ...

        @query("cache_patients_named")
        @cached(ttl=60, tags=["named:{last_name!r:>5}"])
        def named(self, *, last_name: Kind | str) -> int: ...

    plan = Accepted.__plans__["set_birth_date"]
    patient = uuid.uuid4()
    args, _ = plan.bind({"id": str(patient).upper(), "day": "2024-02-29"})
    assert plan.invalidation_tags(args) == ["day:2024-02-29", f"p:{patient}"]
    args, _ = plan.bind({"id": patient, "day": None})  # X | None is checked as X at definition
    with pytest.raises(TypeError) as caught:
        plan.invalidation_tags(args)  # the runner asks before it sends the write
    assert str(caught.value) == (
        "Accepted.set_birth_date(): tag 'day:{day:%Y-%m-%d}' cannot be formatted from its "
        "arguments")


# --- arguments converted to their declared types ------------------------------------------


class Converted(Repository, sql="sql/cache.sql"):
    @query("cache_patient")
    @cached(ttl=60, tags=["patient:{id}"])
    def patient(self, *, id: UUID) -> int: ...

    @query("cache_set_phone", invalidates=["patient:{id}"])
    def set_phone(self, *, id: UUID, phone: str) -> int: ...

    @query("cache_set_phone_quietly")
    def set_phone_plainly(self, *, id: UUID, phone: str) -> int: ...


def test_every_spelling_of_an_id_binds_to_one_value_key_and_tag() -> None:
    patient = uuid.uuid4()
    read, write = Converted.__plans__["patient"], Converted.__plans__["set_phone"]
    keys = KeyMaker("hc", None)
    ns = keys.namespace(uuid.uuid4())
    spellings = [patient, str(patient), str(patient).upper(), f"{{{patient}}}", patient.hex]
    for spelling in spellings:
        args, _ = read.bind({"id": spelling})
        assert args == (patient,) and type(args[0]) is UUID
        assert keys.entry(ns, "q", None, (), args) == keys.entry(ns, "q", None, (), (patient,))
        assert read.tags(("patient:{id}",), args) == [f"patient:{patient}"]
        args, _ = write.bind({"id": spelling, "phone": "+1 555 0100"})
        assert write.invalidation_tags(args) == [f"patient:{patient}"]


def test_a_value_that_does_not_convert_names_the_parameter_never_the_value() -> None:
    secret = "Zqxvorth-PHI-4471"
    for plan, kwargs in ((Converted.__plans__["patient"], {"id": secret}),
                         (Converted.__plans__["set_phone"], {"id": uuid.uuid4(), "phone": 4471})):
        with pytest.raises(TypeError) as caught:
            plan.bind(kwargs)
        name = "id" if "phone" not in kwargs else "phone"
        expected = "UUID" if name == "id" else "str"
        assert str(caught.value) == (
            f"{plan.method}() argument {name!r} is not a valid {expected}")
        assert "4471" not in str(caught.value)
        assert caught.value.__suppress_context__  # pydantic's message quotes the input


def test_plans_that_neither_cache_nor_invalidate_send_what_they_are_given() -> None:
    plan = Converted.__plans__["set_phone_plainly"]
    spelled = str(uuid.uuid4()).upper()
    assert plan.arguments is None
    assert plan.bind({"id": spelled, "phone": "x"})[0] == ("x", spelled)  # $n order


# --- keys ---------------------------------------------------------------------------------


def test_tuple_and_list_arguments_never_share_a_key() -> None:
    """psycopg sends a list as an array and a tuple as a record: two different statements."""
    keys = KeyMaker("hc", None)
    ns = keys.namespace(uuid.uuid4())
    assert keys.entry(ns, "q", None, (), ((1, 2),)) != keys.entry(ns, "q", None, (), ([1, 2],))
    assert keys.entry(ns, "q", None, (), ([(1,)],)) != keys.entry(ns, "q", None, (), ([[1]],))
    assert keys.entry(ns, "q", None, (), ((1, 2),)) == keys.entry(ns, "q", None, (), ((1, 2),))
