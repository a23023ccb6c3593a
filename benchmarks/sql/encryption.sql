-- The clear baselines of bench_encryption: the same reads with the SSN in a plain column.

-- name: get_patient_clear
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn_clear AS ssn, created_at, updated_at
FROM patients
WHERE id = :id

-- name: get_patient_by_clear_ssn
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn_clear AS ssn, created_at, updated_at
FROM patients
WHERE ssn_clear = :ssn

-- name: get_patient_ciphertext
-- The shipped get_patient's SQL, the ciphertext returned as it is (not decrypted).
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn, created_at, updated_at
FROM patient_records
WHERE id = :id
