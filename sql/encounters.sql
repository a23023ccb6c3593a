-- Encounters (visit notes) of the current clinic. A signed note is final.

-- name: get_encounter
SELECT id, clinic_id, patient_id, provider_id, appointment_id, occurred_at, note,
       diagnosis_codes, signed_at, created_at
FROM encounters
WHERE id = :id

-- name: patient_encounters
SELECT id, clinic_id, patient_id, provider_id, appointment_id, occurred_at, note,
       diagnosis_codes, signed_at, created_at
FROM encounters
WHERE patient_id = :patient_id
ORDER BY occurred_at DESC, id DESC
LIMIT :limit

-- name: record_encounter
INSERT INTO encounters (clinic_id, patient_id, provider_id, appointment_id, occurred_at, note,
                        diagnosis_codes)
VALUES (current_setting('app.clinic_id')::uuid, :patient_id, :provider_id, :appointment_id,
        :occurred_at, :note, :diagnosis_codes)
RETURNING id, clinic_id, patient_id, provider_id, appointment_id, occurred_at, note,
          diagnosis_codes, signed_at, created_at

-- name: amend_encounter_note
UPDATE encounters
SET note = :note
WHERE id = :id AND signed_at IS NULL

-- name: sign_encounter
UPDATE encounters
SET signed_at = now()
WHERE id = :id AND signed_at IS NULL
RETURNING signed_at
