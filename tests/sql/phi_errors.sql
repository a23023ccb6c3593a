-- Test-only queries of tests/test_phi_errors.py: errors whose driver messages or inputs
-- carry the values of the call (as PHI would be).

-- name: as_uuid
SELECT CAST(:text AS uuid)

-- name: stream_as_uuid
-- Fails in the second chunk a stream fetches (chunks are 2000 rows).
SELECT CASE WHEN g < 2500 THEN NULL ELSE CAST(:text AS uuid) END
FROM generate_series(1, 3000) AS g

-- name: strict_patient
SELECT id, mrn FROM patients WHERE id = :id

-- name: add_patient
INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)
VALUES (:clinic_id, :mrn, 'Test', 'Patient', DATE '1990-01-01', 'unknown')
RETURNING id
