"""The Redis cache against a real Redis and PostgreSQL: tenant-safe keys, invalidation after
commit only, PHI kept out of key names and (encrypted) out of stored bytes, unreadable
entries as misses. test_cache_cluster runs the key tests again on a 3-node Redis Cluster."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import date
from uuid import UUID

import pytest
import redis
from loguru import logger
from redis.cluster import RedisCluster

from hcrepo import ConfigError, Repository, Settings, query
from hcrepo.cache.codec import CODEC_VERSION
from tests.plugins.database import Database as ServerDatabase
from tests.support.cache import (
    ENCRYPTION_KEY,
    FAKE_PHI,
    CachedDatabase,
    CacheRepo,
    CacheRepoNotPhi,
    CacheRepoOtherModel,
    CacheRepoUntagged,
    CacheRepoV2,
    Counts,
    PlainCount,
    StatementCalls,
    fake_phi_patient,
    keys_of,
    value_keys,
)
from tests.support.repos import Clinic, Clinical, MakeDatabase, new_clinic

Client = redis.Redis | RedisCluster


@pytest.fixture
def two_clinics(migrated_db: ServerDatabase) -> tuple[Clinic, Clinic]:
    return (new_clinic(migrated_db.superuser_url, patients=3),
            new_clinic(migrated_db.superuser_url, patients=1))


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(message.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


# --- tenant isolation ---------------------------------------------------------------------


def test_a_clinics_cached_value_is_never_served_to_another_clinic(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, b = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    counts = Counts("cache_patient_count")
    with db.context(clinic_id=a.id):
        assert repo.count() == 3
        assert repo.count() == 3
    with db.context(clinic_id=b.id):
        assert repo.count() == 1  # same query, same (no) arguments, other clinic
        assert repo.count() == 1
    assert counts["misses"] == 2 and counts["hits"] == 2

    with db.context(clinic_id=a.id):
        row = repo.patient(id=a.patient_ids[0])
        assert row is not None and row.clinic_id == a.id
    with db.context(clinic_id=b.id):
        assert repo.patient(id=a.patient_ids[0]) is None  # row-level security, not A's entry
        assert repo.patient(id=a.patient_ids[0]) is None
    with db.context(clinic_id=a.id):
        assert repo.patient(id=a.patient_ids[0]) == row


def test_every_key_names_its_clinic_and_hashes_the_arguments(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client
) -> None:
    a, _ = two_clinics
    db = cached_db()
    patient = a.patient_ids[0]
    with db.context(clinic_id=a.id):
        CacheRepo(db).patient(id=patient)
    keys = keys_of(raw_redis, db.settings.cache_key_prefix)
    assert keys, "nothing was cached"
    for key in keys:
        assert f"{{c:{a.id.hex}}}".encode() in key
        assert patient.hex.encode() not in key and str(patient).encode() not in key
    [value] = value_keys(raw_redis, db.settings.cache_key_prefix, "cache_patient")
    assert value.startswith(f"{db.settings.cache_key_prefix}:{{c:{a.id.hex}}}:v:".encode())


def test_an_entry_copied_under_another_clinics_key_is_refused(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client
) -> None:
    a, b = two_clinics
    db = cached_db()
    prefix = db.settings.cache_key_prefix
    phi, plain = CacheRepo(db), CacheRepoUntagged(db)
    patient = a.patient_ids[0]
    for clinic in (a, b):
        with db.context(clinic_id=clinic.id):
            phi.patient(id=patient)  # encrypted, tagged
            plain.count()  # plain text, no tags: only its key tells whose it is
    for query_name in ("cache_patient", "cache_patient_count"):
        keys = value_keys(raw_redis, prefix, query_name)
        [key_a] = [k for k in keys if a.id.hex.encode() in k]
        [key_b] = [k for k in keys if b.id.hex.encode() in k]
        raw_redis.set(key_b, raw_redis.get(key_a) or b"", keepttl=True)  # tampering with Redis
    counts = Counts("cache_patient")
    plain_counts = Counts("cache_patient_count")
    with db.context(clinic_id=b.id):
        assert phi.patient(id=patient) is None  # AES-GCM binds the entry to its key
        assert plain.count() == 1  # the key fingerprint in the header does
    assert counts["misses"] == 1 and counts["hits"] == 0
    assert plain_counts["misses"] == 1 and plain_counts["hits"] == 0


# --- invalidation after commit only -------------------------------------------------------


def test_a_committed_write_invalidates_inside_and_outside_a_unit_of_work(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    reader, writer = cached_db(), cached_db()  # two processes of one deployment
    patient = a.patient_ids[0]
    with reader.context(clinic_id=a.id, actor_id=a.actor_id):
        assert CacheRepo(reader).patient(id=patient).phone is None  # type: ignore[union-attr]
        assert CacheRepo(reader).count() == 3
        CacheRepo(writer).set_phone(id=patient, phone="+1 555 0111")  # autocommit write
        assert CacheRepo(reader).patient(id=patient).phone == "+1 555 0111"  # type: ignore[union-attr]
        with writer.unit_of_work() as uow:
            CacheRepo(uow).set_phone(id=patient, phone="+1 555 0112")
            assert CacheRepo(reader).patient(id=patient).phone == "+1 555 0111"  # type: ignore[union-attr]
        assert CacheRepo(reader).patient(id=patient).phone == "+1 555 0112"  # type: ignore[union-attr]


def test_a_rollback_does_not_invalidate(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    patient = a.patient_ids[0]
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        before = repo.patient(id=patient)
        counts = Counts("cache_patient")
        with pytest.raises(RuntimeError), db.unit_of_work() as uow:
            CacheRepo(uow).set_phone(id=patient, phone="+1 555 0121")
            raise RuntimeError("abandon the unit of work")
        assert repo.patient(id=patient) == before
    assert counts["hits"] == 1 and counts["misses"] == 0


def test_a_rolled_back_savepoint_does_not_invalidate_but_its_siblings_do(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    kept, changed = a.patient_ids[0], a.patient_ids[1]
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        before = repo.patient(id=kept)
        repo.patient(id=changed)
        counts = Counts("cache_patient")
        with db.unit_of_work() as uow:
            with pytest.raises(RuntimeError), uow.savepoint():
                CacheRepo(uow).set_phone_only(id=kept, phone="+1 555 0131")
                raise RuntimeError("roll back to the savepoint")
            CacheRepo(uow).set_phone_only(id=changed, phone="+1 555 0132")
    # The next request, with no write position of its own (the writer's block would skip
    # every entry filled before its write, invalidated or not).
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        assert repo.patient(id=kept) == before
        assert counts["hits"] == 1 and counts["misses"] == 0
        assert repo.patient(id=changed).phone == "+1 555 0132"  # type: ignore[union-attr]
        assert counts["misses"] == 1


def test_units_of_work_never_read_or_fill_the_cache(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    patient = a.patient_ids[0]
    with db.context(clinic_id=a.id, actor_id=a.actor_id):
        cached = repo.patient(id=patient)
        assert cached is not None and cached.phone is None
        counts = Counts("cache_patient")
        with pytest.raises(RuntimeError), db.unit_of_work() as uow:
            CacheRepo(uow).set_phone(id=patient, phone="+1 555 0141")
            inside = CacheRepo(uow).patient(id=patient)
            assert inside is not None and inside.phone == "+1 555 0141"  # its own write
            assert counts.delta() == {}  # the unit of work did not touch the cache
            assert repo.patient(id=patient) == cached  # outside: committed state only
            raise RuntimeError("roll back")
        assert repo.patient(id=patient) == cached
    assert counts["hits"] == 2 and counts["misses"] == 0


# --- keys change with the SQL and the model -----------------------------------------------


def test_changing_the_sql_or_the_model_makes_old_entries_unreachable(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client
) -> None:
    a, _ = two_clinics
    db = cached_db()
    patient = a.patient_ids[0]
    with db.context(clinic_id=a.id):
        first = CacheRepo(db).patient(id=patient)
        counts = Counts("cache_patient")
        other_model = CacheRepoOtherModel(db).patient(id=patient)
        assert counts["misses"] == 1 and counts["hits"] == 0
        v2 = Counts("cache_patient_v2")
        CacheRepoV2(db).patient(id=patient)
        assert v2["misses"] == 1
    assert first is not None and other_model is not None and other_model.nickname is None
    prefix = db.settings.cache_key_prefix
    assert len(value_keys(raw_redis, prefix, "cache_patient")) == 2
    assert len(value_keys(raw_redis, prefix, "cache_patient_v2")) == 1


def test_encrypted_and_plain_values_of_one_query_never_share_a_key(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    db = cached_db()
    counts = Counts("cache_patient")
    with db.context(clinic_id=a.id):
        for _ in range(3):
            assert CacheRepo(db).patient(id=a.patient_ids[0]) == CacheRepoNotPhi(db).patient(
                id=a.patient_ids[0]
            )
    assert counts["misses"] == 2 and counts["hits"] == 4


# --- values -------------------------------------------------------------------------------


def test_an_unreadable_entry_is_a_miss_never_an_error(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client
) -> None:
    a, _ = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    prefix = db.settings.cache_key_prefix
    with db.context(clinic_id=a.id):
        expected_count, expected_row = repo.count(), repo.patient(id=a.patient_ids[0])
        [count_key] = value_keys(raw_redis, prefix, "cache_patient_count")
        [row_key] = value_keys(raw_redis, prefix, "cache_patient")
        raw = raw_redis.get(count_key)
        assert raw is not None and raw[0] == CODEC_VERSION
        counts = Counts("cache_patient_count")
        for junk in (b"", b"garbage", bytes([CODEC_VERSION + 1]) + raw[1:], raw[:-3] + b"}}}"):
            raw_redis.set(count_key, junk, keepttl=True)
            assert repo.count() == expected_count
        sealed = raw_redis.get(row_key)
        assert sealed is not None
        raw_redis.set(row_key, sealed[:-1] + bytes([sealed[-1] ^ 1]), keepttl=True)
        assert repo.patient(id=a.patient_ids[0]) == expected_row
    assert counts["misses"] == 4 and counts["hits"] == 0
    assert repo is not None


def test_ttl_presets_and_seconds_bound_the_redis_expiry(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client
) -> None:
    a, _ = two_clinics
    db = cached_db(cache_ttl_presets={"patient": 120, "clinic": 90}, cache_ttl=45)
    prefix = db.settings.cache_key_prefix
    with db.context(clinic_id=a.id):
        CacheRepo(db).patient(id=a.patient_ids[0])
        CacheRepo(db).named(last_name="Patient")
        CacheRepo(db).count()
        CacheRepoUntagged(db).count()
    expected = {"cache_patient": [120], "cache_patients_named": [60],
                "cache_patient_count": [45, 90]}  # ttl="default" is CACHE_TTL
    for query_name, seconds in expected.items():
        ttls = sorted(raw_redis.pttl(key) for key in value_keys(raw_redis, prefix, query_name))
        assert len(ttls) == len(seconds)
        for left, wanted in zip(ttls, seconds, strict=True):
            assert wanted * 1000 - 5000 < left <= wanted * 1000


def test_an_unknown_ttl_preset_names_the_setting(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    db = cached_db(cache_ttl_presets={"clinic": 60})
    with db.context(clinic_id=a.id), pytest.raises(ConfigError) as caught:
        CacheRepo(db).patient(id=a.patient_ids[0])
    assert caught.value.setting == "HCREPO_CACHE_TTL_PRESETS" and "'patient'" in str(caught.value)


# --- PHI ----------------------------------------------------------------------------------


def test_no_phi_in_any_key_name_nor_in_the_encrypted_bytes(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client,
    migrated_db: ServerDatabase,
) -> None:
    a, _ = two_clinics
    db = cached_db()
    repo = CacheRepo(db)
    patient = fake_phi_patient(migrated_db, a.id)
    with db.context(clinic_id=a.id):
        for _ in range(2):
            [found] = repo.named(last_name=FAKE_PHI)  # PHI as an argument
            assert repo.patient(id=patient) == found  # PHI in the value
    secrets = [FAKE_PHI, "123-45-6789", "+1 555 0199", "1971-02-03"]
    keys = keys_of(raw_redis, db.settings.cache_key_prefix)
    assert len(value_keys(raw_redis, db.settings.cache_key_prefix, "cache_patients_named")) == 1
    for key in keys:
        for secret in secrets:
            assert secret.encode() not in key
        stored = raw_redis.get(key) or b""
        for secret in (*secrets, str(patient)):
            assert secret.encode() not in stored


def test_phi_without_an_encryption_key_is_not_cached_and_warned_once(
    cached_db: CachedDatabase, two_clinics: tuple[Clinic, Clinic], raw_redis: Client,
    warnings: list[str], statement_calls: StatementCalls,
) -> None:
    a, _ = two_clinics
    db = cached_db(cache_encryption_key=None)
    repo = CacheRepo(db)
    phi = Counts("cache_patient")
    plain = Counts("cache_patient_count")
    before = statement_calls("cache_patient")
    with db.context(clinic_id=a.id):
        rows = [repo.patient(id=a.patient_ids[0]) for _ in range(3)]
        counts = [repo.count() for _ in range(3)]
    assert rows[0] is not None and rows.count(rows[0]) == 3 and counts == [3, 3, 3]
    assert statement_calls("cache_patient") - before == 3
    assert phi["phi_without_key"] == 3 and phi["hits"] == phi["misses"] == 0
    assert plain["misses"] == 1 and plain["hits"] == 2  # non-PHI still cached, in plain text
    assert value_keys(raw_redis, db.settings.cache_key_prefix, "cache_patient") == []
    assert [w for w in warnings if "cache_patient " in w] == [
        "cached query cache_patient is phi=True and HCREPO_CACHE_ENCRYPTION_KEY is not set: "
        "its results are not cached"
    ]


@pytest.mark.parametrize(
    "key",
    ["not base64!", base64.b64encode(b"short").decode(), base64.b64encode(bytes(33)).decode()],
)
def test_a_bad_encryption_key_raises_config_error_naming_it(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(database_url="postgresql://app@127.0.0.1/db", redis_url="redis://127.0.0.1:1",
                      HCREPO_CACHE_ENCRYPTION_KEY=key)
    assert caught.value.setting == "HCREPO_CACHE_ENCRYPTION_KEY"
    assert key not in str(caught.value)


def test_settings_never_show_the_encryption_key() -> None:
    settings = Settings.load(database_url="postgresql://app@127.0.0.1/db",
                             HCREPO_CACHE_ENCRYPTION_KEY=ENCRYPTION_KEY)
    assert ENCRYPTION_KEY not in repr(settings) and ENCRYPTION_KEY not in str(settings)


def test_without_redis_or_when_disabled_reads_go_to_the_database(
    make_db: MakeDatabase, cache_redis_url: str, two_clinics: tuple[Clinic, Clinic]
) -> None:
    a, _ = two_clinics
    counts = Counts("cache_patient_count")
    for db in (make_db(redis_url=""), make_db(redis_url=cache_redis_url, cache_enabled=False)):
        with db.context(clinic_id=a.id):
            assert CacheRepo(db).count() == PlainCount(db).count() == 3
    assert counts.delta() == {}


class DatedWrites(Repository, sql="sql/cache.sql"):
    @query("cache_set_phone_and_maybe_birth_date", phi=True,
           invalidates=["patient:{id}", "day:{day:%Y-%m-%d}"])
    def set_phone_and_day(self, *, id: UUID, phone: str, day: date | None) -> int: ...


def test_a_tag_that_cannot_be_formatted_fails_before_the_write_is_sent(
    cached_db: CachedDatabase, migrated_db: ServerDatabase
) -> None:
    db = cached_db()
    clinic = new_clinic(migrated_db.superuser_url)
    patient = clinic.patient_ids[0]
    with db.context(clinic_id=clinic.id, actor_id=clinic.actor_id):
        assert DatedWrites(db).set_phone_and_day(id=patient, phone="+1 555 0101",
                                                 day=date(1990, 1, 2)) == 1
        with pytest.raises(TypeError, match="day:"):
            DatedWrites(db).set_phone_and_day(id=patient, phone="+1 555 0102", day=None)
        with pytest.raises(TypeError, match="day:"), db.unit_of_work() as uow:
            DatedWrites(uow).set_phone_and_day(id=patient, phone="+1 555 0103", day=None)
        assert Clinical(db).patient(id=patient).phone == "+1 555 0101"  # type: ignore[union-attr]
