-- Row-level security on every tenant table, and the application role's grants.
-- depends: 0003_clinical

-- The clinic comes from the transaction-local setting app.clinic_id. The sub-select makes
-- PostgreSQL evaluate it once per statement instead of once per row; NULLIF turns an unset
-- or reset setting into NULL, and clinic_id = NULL matches nothing: no context, no rows.
-- FORCE applies the policies to the owner too, so only a superuser sees across clinics.

ALTER TABLE clinic_memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE clinic_memberships FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON clinic_memberships FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

ALTER TABLE patients ENABLE ROW LEVEL SECURITY;
ALTER TABLE patients FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON patients FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

ALTER TABLE providers ENABLE ROW LEVEL SECURITY;
ALTER TABLE providers FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON providers FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

ALTER TABLE appointments ENABLE ROW LEVEL SECURITY;
ALTER TABLE appointments FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON appointments FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

ALTER TABLE encounters ENABLE ROW LEVEL SECURITY;
ALTER TABLE encounters FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON encounters FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

ALTER TABLE prescriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE prescriptions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON prescriptions FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

-- clinics is the directory every clinic may read (look-ups by id, onboarding); the
-- application may register clinics but change only the clinic it acts for.
ALTER TABLE clinics ENABLE ROW LEVEL SECURITY;
ALTER TABLE clinics FORCE ROW LEVEL SECURITY;
CREATE POLICY clinics_directory ON clinics FOR SELECT TO hcrepo_app USING (true);
CREATE POLICY clinics_register ON clinics FOR INSERT TO hcrepo_app WITH CHECK (true);
CREATE POLICY clinics_update_own ON clinics FOR UPDATE TO hcrepo_app
    USING (id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));
CREATE POLICY clinics_owner ON clinics FOR ALL TO hcrepo_owner USING (true) WITH CHECK (true);

-- Least privilege: no TRUNCATE, REFERENCES or TRIGGER anywhere, and no DELETE on records
-- that are kept (clinical rows are cancelled or deactivated through their status columns).
GRANT USAGE ON SCHEMA public TO hcrepo_app;
GRANT SELECT, INSERT, UPDATE ON clinics, users TO hcrepo_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON clinic_memberships TO hcrepo_app;
GRANT SELECT, INSERT, UPDATE ON patients, providers, appointments, encounters, prescriptions
    TO hcrepo_app;
