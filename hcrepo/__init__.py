"""hcrepo: one safe, fast door from typed repositories to PostgreSQL.

This module is the whole public API; everything else is internal.
"""

from hcrepo.compliance.trail import TrailEntry, patient_trail
from hcrepo.config import RoutingPolicy, Settings
from hcrepo.database import Database
from hcrepo.errors import (
    ActorRequired,
    CheckViolation,
    CommitOutcomeUnknown,
    ConfigError,
    ConnectionLost,
    DatabaseError,
    ExclusionViolation,
    ForeignKeyViolation,
    HcrepoError,
    InvalidContext,
    InvalidOrderBy,
    InvalidRow,
    NotFound,
    PageSizeExceeded,
    PoolTimeout,
    QueryError,
    RowSecurityViolation,
    SerializationFailure,
    SqlFileError,
    TenantContextMissing,
    TooManyRows,
    UniqueViolation,
    WriteOutsideUnitOfWork,
)
from hcrepo.repository import Repository, cached, query
from hcrepo.routing.consistency import InvalidToken
from hcrepo.tenancy import Context, bind_context
from hcrepo.unit_of_work import UnitOfWork

__all__ = [
    "ActorRequired",
    "CheckViolation",
    "CommitOutcomeUnknown",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "Database",
    "DatabaseError",
    "ExclusionViolation",
    "ForeignKeyViolation",
    "HcrepoError",
    "InvalidContext",
    "InvalidOrderBy",
    "InvalidRow",
    "InvalidToken",
    "NotFound",
    "PageSizeExceeded",
    "PoolTimeout",
    "QueryError",
    "Repository",
    "RoutingPolicy",
    "RowSecurityViolation",
    "SerializationFailure",
    "Settings",
    "SqlFileError",
    "TenantContextMissing",
    "TooManyRows",
    "TrailEntry",
    "UniqueViolation",
    "UnitOfWork",
    "WriteOutsideUnitOfWork",
    "bind_context",
    "cached",
    "patient_trail",
    "query",
]
