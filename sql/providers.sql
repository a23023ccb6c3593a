-- Providers (doctors, nurses ... who see patients) of the current clinic.

-- name: get_provider
SELECT id, clinic_id, user_id, display_name, specialty, npi, active, on_call, created_at
FROM providers
WHERE id = :id

-- name: list_providers
-- Optional filters (NULL: not filtered).
SELECT id, clinic_id, user_id, display_name, specialty, npi, active, on_call, created_at
FROM providers
WHERE (:active::boolean IS NULL OR active = :active)
  AND (:specialty::text IS NULL OR specialty = :specialty)
ORDER BY display_name, id
LIMIT :limit

-- name: on_call_providers
SELECT id, clinic_id, user_id, display_name, specialty, npi, active, on_call, created_at
FROM providers
WHERE on_call AND active
ORDER BY display_name, id
LIMIT :limit

-- name: create_provider
INSERT INTO providers (clinic_id, user_id, display_name, specialty, npi)
VALUES (current_setting('app.clinic_id')::uuid, :user_id, :display_name, :specialty, :npi)
RETURNING id, clinic_id, user_id, display_name, specialty, npi, active, on_call, created_at

-- name: set_provider_on_call
UPDATE providers
SET on_call = :on_call
WHERE id = :id AND active

-- name: deactivate_provider
UPDATE providers
SET active = false, on_call = false
WHERE id = :id
