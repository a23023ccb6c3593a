-- Patients of the current clinic (row-level security scopes every statement to it).

-- name: get_patient
-- encrypt: patients.ssn
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn, created_at, updated_at
FROM patient_records
WHERE id = :id

-- name: get_patient_by_mrn
-- encrypt: patients.ssn
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn, created_at, updated_at
FROM patient_records
WHERE mrn = :mrn

-- name: get_patient_by_ssn
-- encrypt: patients.ssn
-- blind_index: patients.ssn using digits
-- The SSN is never sent: only its blind index, which the UNIQUE (clinic_id, ssn_bidx)
-- index finds. Staff who may not see SSNs find the patient, with ssn NULL (patient_records
-- gives the ciphertext to the roles that may see it, 0008_field_encryption).
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn, created_at, updated_at
FROM patient_records
WHERE ssn_bidx = :ssn_bidx

-- name: search_patients
-- order_by: sort = last_name, first_name, date_of_birth, mrn, created_at
-- max_page: 200
-- Every filter is optional (NULL: not filtered). The name matches the start of the first or
-- last name, case-insensitively; starts_with keeps '%' and '_' in the input literal.
SELECT id, mrn, first_name, last_name, date_of_birth, sex
FROM patients
WHERE (:name::text IS NULL
       OR starts_with(lower(last_name), lower(:name))
       OR starts_with(lower(first_name), lower(:name)))
  AND (:date_of_birth::date IS NULL OR date_of_birth = :date_of_birth)
  AND (:mrn::text IS NULL OR mrn = :mrn)
ORDER BY :sort, id
LIMIT :limit

-- name: page_patients
-- max_page: 200
-- Keyset pages in (last_name, id) order: pass the last row's last_name and id for the next.
SELECT id, mrn, first_name, last_name, date_of_birth, sex
FROM patients
WHERE (:after_last_name::text IS NULL
       OR (last_name, id) > (:after_last_name, :after_id::uuid))
  AND (:name::text IS NULL
       OR starts_with(lower(last_name), lower(:name))
       OR starts_with(lower(first_name), lower(:name)))
  AND (:date_of_birth::date IS NULL OR date_of_birth = :date_of_birth)
ORDER BY last_name, id
LIMIT :limit

-- name: count_patients
SELECT count(*)
FROM patients

-- name: stream_patients
-- encrypt: patients.ssn
-- Exports and batch jobs: every patient of the clinic, in id order, through a cursor.
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
       ssn, created_at, updated_at
FROM patient_records
ORDER BY id

-- name: create_patient
-- encrypt: patients.ssn
-- blind_index: patients.ssn using digits
-- generate: id
-- The id is made in the application: the SSN's ciphertext is bound to it before sending.
-- The application role cannot read the ssn column, so the row's SSN comes back as sent.
INSERT INTO patients (id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone,
                      email, address, ssn, ssn_bidx)
VALUES (:id, current_setting('app.clinic_id')::uuid, :mrn, :first_name, :last_name,
        :date_of_birth, :sex, :phone, :email, :address, :ssn, :ssn_bidx)
RETURNING id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address,
          :ssn::text AS ssn, created_at, updated_at

-- name: set_patient_ssn
-- encrypt: patients.ssn
-- blind_index: patients.ssn using digits
UPDATE patients
SET ssn = :ssn, ssn_bidx = :ssn_bidx
WHERE id = :id

-- name: update_patient_contact
UPDATE patients
SET phone = :phone, email = :email, address = :address
WHERE id = :id

-- name: update_patient_name
UPDATE patients
SET first_name = :first_name, last_name = :last_name
WHERE id = :id

-- name: patient_timeline
-- Newest first. Keyset pages: pass the last entry's occurred_at and id for older entries.
-- Each branch is index-ordered on (clinic_id, patient_id, time), so the planner merges them.
SELECT kind, id, occurred_at, provider_id, status, summary
FROM (
    SELECT 'appointment' AS kind, id, starts_at AS occurred_at, provider_id, status,
           reason AS summary
    FROM appointments
    WHERE patient_id = :patient_id
    UNION ALL
    SELECT 'encounter', id, occurred_at, provider_id,
           CASE WHEN signed_at IS NULL THEN 'unsigned' ELSE 'signed' END,
           array_to_string(diagnosis_codes, ', ')
    FROM encounters
    WHERE patient_id = :patient_id
    UNION ALL
    SELECT 'prescription', id, prescribed_at, prescriber_id, status,
           drug_name || ' ' || dosage
    FROM prescriptions
    WHERE patient_id = :patient_id
) AS events
WHERE (:before_occurred_at::timestamptz IS NULL
       OR (occurred_at, id) < (:before_occurred_at, :before_id::uuid))
ORDER BY occurred_at DESC, id DESC
LIMIT :limit
