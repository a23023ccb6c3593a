-- name: touch_patient
UPDATE patients SET updated_at = now() WHERE id = :id
