-- name: get_patient
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address
FROM patients WHERE id = :id
