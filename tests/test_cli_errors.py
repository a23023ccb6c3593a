"""Every subcommand meets bad input with one line on stderr naming what to fix, exit 2,
nothing on stdout, no traceback and nothing written."""

from __future__ import annotations

import types
import typing
from enum import Enum

import pytest
from pydantic import SecretStr

from hcrepo import Settings
from hcrepo.cli import main
from hcrepo.testing import free_port
from tests.support.cli import assert_one_line, hcrepo

# Settings whose type accepts any text: a value their own check refuses.
_REFUSED_TEXT = {
    "DATABASE_URL": "nonsense here",
    "HCREPO_OWNER_URL": "host=a junk",
    "READ_REPLICA_URLS": "host=a junk",
    "REDIS_URL": "http://cache",
    "HCREPO_CACHE_PREFIX": "{clinic}",
    "HCREPO_CACHE_ENCRYPTION_KEY": "c2hvcnQ=",
}


def _refused_value(annotation: object) -> str | None:
    """A value no setting of this type accepts (None: the type accepts any text)."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return "perhaps"
    if origin in (int, float):
        return "plenty"
    if origin is dict:
        return "notjson"
    if isinstance(origin, type) and issubclass(origin, Enum):
        return "no-such-choice"
    return None


def _refused_settings() -> list[tuple[str, str]]:
    cases = []
    for field in Settings.model_fields.values():
        assert field.alias is not None  # every setting is read from a named variable
        value = _REFUSED_TEXT.get(field.alias)
        if value is None and field.annotation not in (str, SecretStr | None, str | None):
            value = _refused_value(field.annotation)
        if value is not None:
            cases.append((field.alias, value))
    return cases


@pytest.mark.parametrize(("variable", "value"), _refused_settings())
@pytest.mark.parametrize("command", [["migrate", "list"], ["check"]])
def test_every_refused_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: list[str], variable: str, value: str,
) -> None:
    # Valid but unreachable: a setting that slipped through would fail on connecting instead.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:pw@127.0.0.1:{free_port()}/app")
    monkeypatch.setenv(variable, value)
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(err, starts=f"hcrepo: {variable}: ")
    assert value not in err.removeprefix(f"hcrepo: {variable}: ")


def test_the_json_setting_of_the_report_is_one_line() -> None:
    result = hcrepo("migrate", "list", env={
        "DATABASE_URL": f"postgresql://app@127.0.0.1:{free_port()}/app",
        "HCREPO_CACHE_TTL_PRESETS": "notjson",
    })
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("hcrepo: HCREPO_CACHE_TTL_PRESETS: is not valid JSON (Expecting "
                             "value at character 0)\n")


def _closed() -> str:
    return f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/postgres"


@pytest.mark.parametrize(
    ("args", "env", "starts"),
    [
        (["bootstrap", "--superuser-url", "SU"], {"HCREPO_APP_PASSWORD": "a"},
         "hcrepo: HCREPO_OWNER_PASSWORD: is not set (it holds the password for hcrepo_owner)"),
        (["bootstrap", "--superuser-url", "SU", "--app-password-env", "MY_APP_PW"],
         {"HCREPO_OWNER_PASSWORD": "o", "HCREPO_APP_PASSWORD": "a"},
         "hcrepo: MY_APP_PW: is not set (it holds the password for hcrepo_app)"),
        (["bootstrap", "--superuser-url", "SU"],
         {"HCREPO_OWNER_PASSWORD": "o", "HCREPO_APP_PASSWORD": ""},
         "hcrepo: HCREPO_APP_PASSWORD: is empty"),
        (["bootstrap", "--superuser-url", "host=a junk"],
         {"HCREPO_OWNER_PASSWORD": "o", "HCREPO_APP_PASSWORD": "a"},
         "hcrepo: --superuser-url: not a valid PostgreSQL URL"),
        (["bootstrap", "--superuser-url", "SU"],
         {"HCREPO_OWNER_PASSWORD": "o", "HCREPO_APP_PASSWORD": "a"},
         "hcrepo: --superuser-url: cannot connect: "),
        (["bootstrap", "--superuser-url", "SU", "--owner-password-env", "NOT A NAME"], {},
         "hcrepo bootstrap: argument --owner-password-env: not an environment variable name"),
        (["bootstrap"], {}, "hcrepo bootstrap: the following arguments are required: "
         "--superuser-url"),
        (["migrate", "apply"], {"HCREPO_OWNER_URL": "nonsense here"},
         "hcrepo: HCREPO_OWNER_URL: not a valid PostgreSQL URL"),
        (["migrate", "rollback", "--count", "0"], {},
         "hcrepo migrate rollback: argument --count: must be 1 or more"),
        (["migrate", "list", "--database", "SU"], {}, "hcrepo: --database: cannot connect: "),
        (["check"], {}, "hcrepo: DATABASE_URL: is required but not set"),
        (["check", "--module", "no_such_module_here", "--database", "SU"], {},
         "hcrepo: --module: cannot import no_such_module_here"),
        (["demo", "--clinics", "3"], {}, "hcrepo: unrecognized arguments: --clinics 3"),
    ],
)
def test_each_subcommand_meets_bad_input_with_one_line(
    args: list[str], env: dict[str, str], starts: str
) -> None:
    url = _closed()
    result = hcrepo(*[url if arg == "SU" else arg for arg in args], env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert_one_line(result.stderr, starts=starts)
    assert "s3cret" not in result.stderr
