-- Test-only queries of the cache tests (tests/cache_support.py). Names start with cache_ so
-- their metrics and pg_stat_statements rows belong to these tests alone.

-- name: cache_patient
SELECT id, clinic_id, mrn, last_name, phone FROM patients WHERE id = :id

-- name: cache_patient_v2
SELECT id, clinic_id, mrn, last_name, phone FROM patients WHERE id = :id AND true

-- name: cache_patients_named
SELECT id, clinic_id, mrn, last_name, phone FROM patients WHERE last_name = :last_name ORDER BY id

-- name: cache_patient_count
SELECT count(*) FROM patients

-- name: cache_set_phone
UPDATE patients SET phone = :phone WHERE id = :id

-- name: cache_set_phone_quietly
UPDATE patients SET phone = :phone WHERE id = :id

-- name: cache_gated_patient
-- timeout: 30s
SELECT p.id, p.clinic_id, p.mrn, p.last_name, p.phone
FROM patients p, LATERAL (SELECT pg_advisory_xact_lock_shared(:gate)) AS g
WHERE p.id = :id

-- name: cache_gated_count
-- timeout: 30s
SELECT count(*) FROM patients, LATERAL (SELECT pg_advisory_xact_lock_shared(:gate)) AS g

-- name: cache_actor_setting
SELECT current_setting('app.actor_id', true)

-- name: cache_set_birth_date
UPDATE patients SET date_of_birth = :day WHERE id = :id

-- name: cache_set_phone_and_maybe_birth_date
UPDATE patients SET phone = :phone, date_of_birth = coalesce(:day, date_of_birth)
WHERE id = :id
