"""The one error the throw-away servers raise."""

from __future__ import annotations

from hcrepo.errors import HcrepoError


class EmbeddedServerError(HcrepoError):
    """A throw-away server could not be found, started, reached or stopped."""
