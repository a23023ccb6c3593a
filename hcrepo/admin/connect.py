"""Plain connections for the administration commands: a failure to connect is a
`ConfigError` naming the setting the URL came from, in one line, never with the password."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hcrepo.config import connect_failure
from hcrepo.errors import ConfigError

# A refused or silent host must not hang a command; an explicit value in the URL wins.
_CONNECT_TIMEOUT = "10"


def conninfo_url(url: str, **changes: str) -> str:
    """`url` (URL or key=value conninfo) as a postgresql:// URL, with `changes` applied."""
    params = {key: str(value) for key, value in conninfo_to_dict(url).items()}
    params.update(changes)
    netloc = ""
    if "user" in params:
        netloc = quote(params.pop("user"), safe="")
        if "password" in params:
            netloc += ":" + quote(params.pop("password"), safe="")
        netloc += "@"
    host = params.get("host", "")
    # Unix socket directories and multi-host lists stay in the query string.
    if host and not host.startswith("/") and "," not in host:
        netloc += f"[{params.pop('host')}]" if ":" in host else params.pop("host")
        if "port" in params:
            netloc += f":{params.pop('port')}"
    dbname = quote(params.pop("dbname", ""), safe="")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{dbname}{query}"


def params(url: str, setting: str) -> dict[str, str]:
    try:
        params = {key: str(value) for key, value in conninfo_to_dict(url).items()}
    except psycopg.ProgrammingError:
        raise ConfigError(setting, "not a valid PostgreSQL URL") from None
    params.setdefault("connect_timeout", _CONNECT_TIMEOUT)
    return params


@contextmanager
def connect(url: str, setting: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    """A plain psycopg connection; failing to connect raises `ConfigError` naming `setting`,
    with the password masked."""
    try:
        conn = psycopg.connect(make_conninfo(**params(url, setting)), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConfigError(setting, f"cannot connect: {connect_failure(exc, url)}") from None
    with conn:
        yield conn

