"""hcrepo: one safe, fast door from typed repositories to PostgreSQL.

This module is the whole public API; everything else is internal.
"""

from hcrepo.compliance.trail import TrailEntry, patient_trail
from hcrepo.config import RoutingPolicy, Settings
from hcrepo.crypto.keys import MasterKeys
from hcrepo.database import Database
from hcrepo.errors import (
    ActorRequired,
    CheckViolation,
    CommitOutcomeUnknown,
    ConfigError,
    ConnectionLost,
    DatabaseError,
    DecryptionFailed,
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
from hcrepo.phi.fields import PHI, Encrypted
from hcrepo.phi.logs import MaskingFilter, mask_record
from hcrepo.phi.masking import mask
from hcrepo.phi.patients import PatientId
from hcrepo.phi.phi_model import PhiModel
from hcrepo.repository import Repository, cached, query
from hcrepo.routing.consistency import InvalidToken
from hcrepo.tenancy import Context, EmergencyAccess, bind_context
from hcrepo.unit_of_work import UnitOfWork

__all__ = [
    "PHI",
    "ActorRequired",
    "CheckViolation",
    "CommitOutcomeUnknown",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "Database",
    "DatabaseError",
    "DecryptionFailed",
    "EmergencyAccess",
    "Encrypted",
    "ExclusionViolation",
    "ForeignKeyViolation",
    "HcrepoError",
    "InvalidContext",
    "InvalidOrderBy",
    "InvalidRow",
    "InvalidToken",
    "MaskingFilter",
    "MasterKeys",
    "NotFound",
    "PageSizeExceeded",
    "PatientId",
    "PhiModel",
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
    "mask",
    "mask_record",
    "patient_trail",
    "query",
]
