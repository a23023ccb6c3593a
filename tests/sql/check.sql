-- Queries that `hcrepo check` must flag (tests/test_check.py); each names its problem.

-- name: select_star
SELECT * FROM providers LIMIT :limit

-- name: list_without_limit
SELECT id, name FROM clinics ORDER BY name

-- name: stream_without_limit
SELECT id, name FROM clinics ORDER BY name

-- name: scalar_of_the_wrong_type
SELECT name FROM clinics WHERE id = :id

-- name: delete_without_privilege
DELETE FROM patients WHERE id = :id

-- name: missing_column
SELECT id,
       name,
       no_such_column
FROM clinics

-- name: model_mismatch
SELECT id, name, timezone AS zone FROM clinics LIMIT 1

-- name: parameter_of_the_wrong_type
SELECT id, name FROM clinics WHERE id = :id

-- name: tenant_table_without_tenant
SELECT count(*) FROM patients
