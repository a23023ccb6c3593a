"""Connections of the audit commands, and the auditor's own use logged before anything is
read (audit.auditor_log, through the definer function audit.log_auditor)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from hcrepo.admin.connect import connect


@contextmanager
def session(url: str, setting: str, command: str, args: dict[str, Any]) -> Iterator[
        psycopg.Connection]:
    """A connection to read the audit schema, after `command` and `args` are logged and
    committed: a use is logged even when what follows fails. Reads run in one read-only
    repeatable-read transaction, so a report is of one moment."""
    with connect(url, setting) as conn:
        conn.execute("SELECT audit.log_auditor(%s, %s)", [command, Jsonb(args)])
        conn.commit()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn
        conn.rollback()
