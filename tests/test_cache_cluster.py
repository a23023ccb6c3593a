"""The cache's key tests again, on a real three-master Redis Cluster (redis-py RedisCluster,
REDIS_URL=redis+cluster://...), and the hash-tag layout that makes it work: a value, its lock
and the generations it depends on share one slot; different clinics spread over the nodes."""

from __future__ import annotations

import uuid

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from hcrepo.cache.keys import KeyMaker
from hcrepo.cache.store import CLUSTER_SCHEME
from hcrepo.testing import RedisCluster as EmbeddedCluster
from tests.plugins.database import Database as ServerDatabase
from tests.support.cache import CachedDatabase, CacheRepo, keys_of
from tests.support.repos import Clinic, new_clinic
from tests.test_cache import (  # noqa: F401  (the same tests and their fixtures)
    test_a_clinics_cached_value_is_never_served_to_another_clinic,
    test_a_committed_write_invalidates_inside_and_outside_a_unit_of_work,
    test_a_rollback_does_not_invalidate,
    test_a_rolled_back_savepoint_does_not_invalidate_but_its_siblings_do,
    test_an_entry_copied_under_another_clinics_key_is_refused,
    test_an_unreadable_entry_is_a_miss_never_an_error,
    test_changing_the_sql_or_the_model_makes_old_entries_unreachable,
    test_every_key_names_its_clinic_and_hashes_the_arguments,
    test_no_phi_in_any_key_name_nor_in_the_encrypted_bytes,
    test_units_of_work_never_read_or_fill_the_cache,
    two_clinics,
)
from tests.test_cache_race import (  # noqa: F401
    own_clinic,
    test_a_reader_that_read_before_a_commit_cannot_store_a_stale_value,
    test_a_stale_value_is_served_while_exactly_one_refresh_runs,
    test_fifty_threads_missing_at_once_cost_one_database_query,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def cache_redis_url(redis_cluster: EmbeddedCluster) -> str:
    host, port = redis_cluster.startup_nodes[0]
    return f"{CLUSTER_SCHEME}{host}:{port}"


def test_an_entry_its_lock_and_its_generations_share_one_slot() -> None:
    keys = KeyMaker("hc", None)
    clinic = uuid.uuid4()
    ns = keys.namespace(clinic)
    entry = keys.entry(ns, "get_patient:abc", clinic, (uuid.uuid4(),), (uuid.uuid4(),))
    together = [keys.value_key(ns, entry), keys.lock_key(ns, entry),
                keys.tag_key(ns, "patient:1"), keys.tag_key(ns, "patients")]
    assert len({key_slot(key.encode()) for key in together}) == 1
    shared = keys.namespace(None, tenant_scoped=False)
    entry = keys.entry(shared, "clinics:abc", clinic, (), ())
    assert clinic.hex in keys.value_key(shared, entry)  # non-tenant values still name a clinic
    assert key_slot(keys.value_key(shared, entry).encode()) == key_slot(
        keys.tag_key(shared, "clinic:1").encode()
    )


def test_clinics_spread_over_the_cluster_nodes(
    cached_db: CachedDatabase, migrated_db: ServerDatabase, raw_redis: RedisCluster
) -> None:
    db = cached_db()
    clinics: list[Clinic] = [new_clinic(migrated_db.superuser_url) for _ in range(8)]
    for clinic in clinics:
        with db.context(clinic_id=clinic.id):
            assert CacheRepo(db).count() == 1
            assert CacheRepo(db).count() == 1
    nodes = {
        raw_redis.get_node_from_key(key).name
        for key in keys_of(raw_redis, db.settings.cache_key_prefix)
    }
    assert len(nodes) >= 2
