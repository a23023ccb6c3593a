-- Test-only queries on tenant tables (row-level security scopes every one to app.clinic_id).

-- name: count_bookings
SELECT count(*) FROM appointments WHERE provider_id = :provider_id AND starts_at = :starts_at

-- name: on_call_count
SELECT count(*) FROM providers WHERE on_call

-- name: go_off_call
UPDATE providers SET on_call = false WHERE id = :id

-- name: is_on_call
SELECT on_call FROM providers WHERE id = :id

-- name: patients
SELECT id, clinic_id, mrn, phone FROM patients ORDER BY id

-- name: stream_patients
SELECT id, clinic_id, mrn, phone FROM patients ORDER BY id

-- name: patient
SELECT id, clinic_id, mrn, phone FROM patients WHERE id = :id

-- name: set_phone
UPDATE patients SET phone = :phone WHERE id = :id

-- name: add_patient
INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)
VALUES (:clinic_id, :mrn, 'Test', 'Patient', DATE '1990-01-01', 'unknown')
RETURNING id

-- name: count_mrn
SELECT count(*) FROM patients WHERE mrn = :mrn
