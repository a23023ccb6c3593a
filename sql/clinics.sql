-- Clinic directory. Every clinic may read it (policy clinics_directory) and register new
-- clinics; a clinic may change only its own row (policy clinics_update_own).

-- name: get_clinic
SELECT id, name, timezone, created_at
FROM clinics
WHERE id = :id

-- name: list_clinics
-- Keyset pages in (name, id) order: pass the last row's name and id for the next page.
SELECT id, name, timezone, created_at
FROM clinics
WHERE (:after_name::text IS NULL OR (name, id) > (:after_name, :after_id::uuid))
ORDER BY name, id
LIMIT :limit

-- name: create_clinic
INSERT INTO clinics (name, timezone)
VALUES (:name, :timezone)
RETURNING id, name, timezone, created_at

-- name: update_clinic
UPDATE clinics
SET name = :name, timezone = :timezone
WHERE id = :id
