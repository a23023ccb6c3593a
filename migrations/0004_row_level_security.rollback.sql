REVOKE ALL ON clinics, users, clinic_memberships, patients, providers, appointments,
    encounters, prescriptions FROM hcrepo_app;
REVOKE USAGE ON SCHEMA public FROM hcrepo_app;
DROP POLICY clinics_owner ON clinics;
DROP POLICY clinics_update_own ON clinics;
DROP POLICY clinics_register ON clinics;
DROP POLICY clinics_directory ON clinics;
ALTER TABLE clinics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE clinics DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON prescriptions;
ALTER TABLE prescriptions NO FORCE ROW LEVEL SECURITY;
ALTER TABLE prescriptions DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON encounters;
ALTER TABLE encounters NO FORCE ROW LEVEL SECURITY;
ALTER TABLE encounters DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON appointments;
ALTER TABLE appointments NO FORCE ROW LEVEL SECURITY;
ALTER TABLE appointments DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON providers;
ALTER TABLE providers NO FORCE ROW LEVEL SECURITY;
ALTER TABLE providers DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON patients;
ALTER TABLE patients NO FORCE ROW LEVEL SECURITY;
ALTER TABLE patients DISABLE ROW LEVEL SECURITY;

DROP POLICY tenant_isolation ON clinic_memberships;
ALTER TABLE clinic_memberships NO FORCE ROW LEVEL SECURITY;
ALTER TABLE clinic_memberships DISABLE ROW LEVEL SECURITY;
