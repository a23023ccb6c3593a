-- Staff: the user directory (no clinic_id: one account may work for several clinics) and
-- the current clinic's memberships (clinic_memberships, under row-level security).

-- name: get_user
SELECT id, email, full_name, role, active, created_at
FROM users
WHERE id = :id

-- name: get_user_by_email
SELECT id, email, full_name, role, active, created_at
FROM users
WHERE email = :email

-- name: create_user
INSERT INTO users (email, full_name, role)
VALUES (:email, :full_name, :role)
RETURNING id, email, full_name, role, active, created_at

-- name: set_user_active
UPDATE users
SET active = :active
WHERE id = :id

-- name: list_members
SELECT u.id AS user_id, u.email, u.full_name, m.role, u.active
FROM clinic_memberships AS m
JOIN users AS u ON u.id = m.user_id
ORDER BY u.full_name, u.id
LIMIT :limit

-- name: add_member
INSERT INTO clinic_memberships (clinic_id, user_id, role)
VALUES (current_setting('app.clinic_id')::uuid, :user_id, :role)

-- name: remove_member
DELETE FROM clinic_memberships
WHERE user_id = :user_id
