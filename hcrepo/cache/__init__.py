"""The Redis cache of repository reads: `Cache` (reads, fills, refreshes, invalidation after
commit), its key names (keys), entry format (codec), Redis operations (store) and the queue of
invalidations that could not land (invalidation).

May import the shared modules (config, errors, tenancy), the declaration layer (plan, results)
and hcrepo.ops; it never imports the facade or routing: the database read it caches comes in
as a function.
"""

from hcrepo.cache.cache import Cache

__all__ = ["Cache"]
