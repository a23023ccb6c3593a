-- The staff directory under row-level security, onboarding through one definer function,
-- and no temporary tables for the application role.
-- depends: 0004_row_level_security

-- users has no clinic_id (one account may work for several clinics), so a clinic sees and
-- changes a user only through a membership in the clinic it acts for: it cannot list, read
-- or deactivate another clinic's staff. The EXISTS reads clinic_memberships under that
-- table's own policy; the sub-select evaluates the setting once per statement, and no
-- context (NULL) matches no membership.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_member_read ON users FOR SELECT TO hcrepo_app
    USING (EXISTS (
        SELECT FROM clinic_memberships AS m
        WHERE m.user_id = users.id
          AND m.clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)
    ));
CREATE POLICY users_member_update ON users FOR UPDATE TO hcrepo_app
    USING (EXISTS (
        SELECT FROM clinic_memberships AS m
        WHERE m.user_id = users.id
          AND m.clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)
    ))
    WITH CHECK (EXISTS (
        SELECT FROM clinic_memberships AS m
        WHERE m.user_id = users.id
          AND m.clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid)
    ));
CREATE POLICY users_owner ON users FOR ALL TO hcrepo_owner USING (true) WITH CHECK (true);

-- Onboarding is the application's only way to create a user: the account and its first
-- membership, in the clinic in context, in one statement. A plain INSERT could not do it
-- under the policies above (a user with no membership yet is visible to nobody), and an
-- e-mail that already exists stays a unique violation: attaching the existing account
-- instead would let any clinic take over another clinic's staff by naming their e-mail.
-- An existing user joins another clinic through clinic_memberships, by id.
-- SECURITY DEFINER runs as hcrepo_owner; the fixed search_path (pg_temp last, every name
-- qualified) keeps a caller's objects from standing in for the tables.
CREATE FUNCTION onboard_staff(staff_email text, staff_full_name text, staff_role text)
RETURNS public.users
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    clinic uuid := NULLIF(current_setting('app.clinic_id', true), '')::uuid;
    created public.users;
BEGIN
    IF clinic IS NULL THEN
        RAISE EXCEPTION 'onboard_staff needs a clinic in context (app.clinic_id)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO public.users (email, full_name, role)
    VALUES (staff_email, staff_full_name, staff_role)
    RETURNING * INTO created;
    INSERT INTO public.clinic_memberships (clinic_id, user_id, role)
    VALUES (clinic, created.id, staff_role);
    RETURN created;
END
$$;
REVOKE ALL ON FUNCTION onboard_staff(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION onboard_staff(text, text, text) TO hcrepo_app;

-- No INSERT (onboard_staff is the door), and UPDATE only of what one clinic may change for
-- everyone the account works for: an e-mail (where logins and resets go) or the account's
-- default role changed by one clinic would change them for the others too.
REVOKE INSERT, UPDATE ON users FROM hcrepo_app;
GRANT UPDATE (full_name, active) ON users TO hcrepo_app;

-- Temporary tables have no row-level security and live as long as the server session, which
-- a pool hands from one clinic's request to the next: one clinic's rows copied into a temp
-- table were readable by the next clinic on that connection. The application role gets no
-- TEMPORARY privilege at all. The alternative, dropping temp objects whenever a connection
-- goes back to the pool, costs a round trip on every checkout and still misses WITH HOLD
-- cursors, prepared statements and the rest of session state; hcrepo's .sql compiler
-- refuses those statements instead. Other roles keep TEMPORARY only by an explicit grant.
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, hcrepo_app', current_database());
END
$$;
