DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END
$$;

REVOKE UPDATE (full_name, active) ON users FROM hcrepo_app;
GRANT INSERT, UPDATE ON users TO hcrepo_app;

DROP FUNCTION onboard_staff(text, text, text);

DROP POLICY users_owner ON users;
DROP POLICY users_member_update ON users;
DROP POLICY users_member_read ON users;
ALTER TABLE users NO FORCE ROW LEVEL SECURITY;
ALTER TABLE users DISABLE ROW LEVEL SECURITY;
