"""Fixtures for the unit-of-work, transaction and context tests: hcrepo Databases on
migrated_db as hcrepo_app, and a clinic per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hcrepo import Database, Settings
from tests.plugins.database import Database as ServerDatabase
from tests.support.repos import Clinic, MakeDatabase, new_clinic


@pytest.fixture
def make_db(migrated_db: ServerDatabase) -> Iterator[MakeDatabase]:
    """Open hcrepo Databases on migrated_db as hcrepo_app (settings may be overridden)."""
    opened: list[Database] = []

    def make(**overrides: Any) -> Database:
        options: dict[str, Any] = {
            "database_url": migrated_db.app_url, "redis_url": "", "pool_min": 1, "pool_max": 4,
            **overrides,
        }
        db = Database(Settings(**options))
        db.open()
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.close()


@pytest.fixture
def clinic(migrated_db: ServerDatabase) -> Clinic:
    return new_clinic(migrated_db.superuser_url, providers=2, patients=2)
