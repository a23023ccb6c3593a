"""Redis cache for repository reads (issue 6 builds it; this is the seam Database calls)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hcrepo.config import Settings
from hcrepo.tenancy import Context

if TYPE_CHECKING:
    from hcrepo.repository import Plan


class Cache:
    """Tenant-safe cache of read results, invalidated by tag after commit."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Cache | None:
        """None when REDIS_URL is empty or CACHE_ENABLED is false."""
        return None

    def fetch(
        self,
        plan: Plan,
        args: tuple[Any, ...],
        sql: str,
        context: Context,
        load: Callable[[], Any],
    ) -> Any:
        return load()

    def invalidate(self, context: Context, tags: Sequence[str]) -> None:
        """Called after COMMIT succeeded, never after a rollback."""

    def close(self) -> None:
        """Release Redis connections."""
