-- Prescriptions of the current clinic.

-- name: get_prescription
SELECT id, clinic_id, patient_id, prescriber_id, encounter_id, drug_name, dosage, frequency,
       quantity, refills, status, prescribed_at, notes, created_at
FROM prescriptions
WHERE id = :id

-- name: patient_prescriptions
SELECT id, clinic_id, patient_id, prescriber_id, encounter_id, drug_name, dosage, frequency,
       quantity, refills, status, prescribed_at, notes, created_at
FROM prescriptions
WHERE patient_id = :patient_id AND (NOT :active_only OR status = 'active')
ORDER BY prescribed_at DESC, id DESC
LIMIT :limit

-- name: prescribe
INSERT INTO prescriptions (clinic_id, patient_id, prescriber_id, encounter_id, drug_name,
                           dosage, frequency, quantity, refills, notes)
VALUES (current_setting('app.clinic_id')::uuid, :patient_id, :prescriber_id, :encounter_id,
        :drug_name, :dosage, :frequency, :quantity, :refills, :notes)
RETURNING id, clinic_id, patient_id, prescriber_id, encounter_id, drug_name, dosage, frequency,
          quantity, refills, status, prescribed_at, notes, created_at

-- name: use_refill
-- The refills left after this one; no row when none was left or the prescription is closed.
UPDATE prescriptions
SET refills = refills - 1
WHERE id = :id AND status = 'active' AND refills > 0
RETURNING refills

-- name: set_prescription_status
UPDATE prescriptions
SET status = :status
WHERE id = :id
