-- Staff: user accounts and the current clinic's memberships (clinic_memberships).
--
-- users has no clinic_id (one account may work for several clinics). Row-level security
-- shows a user to a clinic, and lets it change the account's name and active flag, only
-- through a membership in the clinic in context (app.clinic_id): a clinic cannot list, read
-- or deactivate another clinic's staff, and with no clinic nobody is visible.
--
-- Onboarding: onboard_staff (migrations/0005) is the application's only way to create a
-- user. It creates the account and its membership in the clinic in context in one statement
-- and refuses without a clinic; the query is a SELECT of a function that writes, hence
-- `kind: write` (it goes to the primary). An e-mail that already exists, in any clinic, is
-- a unique violation: it never attaches the existing account, which would let a clinic take
-- over another clinic's staff by naming their e-mail.
--
-- An existing user joins another clinic through add_member (StaffRepository.add(user_id=...)).
-- The id is the capability: the user or a clinic they already work for hands it over, since
-- a clinic cannot list other clinics' users to find one.

-- name: get_user
SELECT id, email, full_name, role, active, created_at
FROM users
WHERE id = :id

-- name: get_user_by_email
SELECT id, email, full_name, role, active, created_at
FROM users
WHERE email = :email

-- name: onboard_staff
-- kind: write
SELECT id, email, full_name, role, active, created_at
FROM onboard_staff(:email, :full_name, :role)

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
