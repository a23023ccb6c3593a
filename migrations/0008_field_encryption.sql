-- Field encryption: patients.ssn holds ciphertext sealed by the application (AES-256-GCM
-- under the clinic's data key, hcrepo.crypto), searched through its blind index; the
-- clinics' wrapped data keys; the append-only record of key rotations; and SSN visibility
-- by staff role, enforced here and not only in Python.
-- depends: 0007_staff_roles

-- Existing plaintext SSNs cannot be encrypted here: the keys never reach the database. They
-- are moved aside, out of the application's reach, for `hcrepo keys encrypt-existing`, which
-- seals each one into its row and deletes it from here. The owner is subject to the tenant
-- policies (FORCE), so it stops being forced for the move, inside this transaction only.
CREATE TABLE patients_plaintext_ssn (
    patient_id uuid PRIMARY KEY,
    clinic_id  uuid NOT NULL,
    ssn        text NOT NULL,
    moved_at   timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (clinic_id, patient_id) REFERENCES patients (clinic_id, id)
);
CREATE INDEX patients_plaintext_ssn_clinic_idx ON patients_plaintext_ssn (clinic_id);
ALTER TABLE patients NO FORCE ROW LEVEL SECURITY;
INSERT INTO patients_plaintext_ssn (patient_id, clinic_id, ssn)
SELECT id, clinic_id, ssn FROM patients WHERE ssn IS NOT NULL;
UPDATE patients SET ssn = NULL WHERE ssn IS NOT NULL;
ALTER TABLE patients FORCE ROW LEVEL SECURITY;
ALTER TABLE patients_plaintext_ssn ENABLE ROW LEVEL SECURITY;
ALTER TABLE patients_plaintext_ssn FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON patients_plaintext_ssn FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));

-- From now on the database refuses a plaintext SSN: only hcrepo's ciphertext format
-- (hcrepo/compliance/envelope.py) fits, and a value always comes with its blind index (a
-- keyed HMAC-SHA256 of the digits), unique within the clinic. bytea, not hex text: the
-- index compares bytes, where text would compare through the collation.
ALTER TABLE patients ADD COLUMN ssn_bidx bytea;
ALTER TABLE patients ADD CONSTRAINT patients_ssn_is_ciphertext
    CHECK (ssn IS NULL OR ssn ~ '^hc1:[1-9][0-9]{0,8}:[A-Za-z0-9+/]+={0,2}$');
ALTER TABLE patients ADD CONSTRAINT patients_ssn_bidx_is_hmac
    CHECK (ssn_bidx IS NULL OR octet_length(ssn_bidx) = 32);
ALTER TABLE patients ADD CONSTRAINT patients_ssn_has_bidx
    CHECK ((ssn IS NULL) = (ssn_bidx IS NULL));
ALTER TABLE patients ADD CONSTRAINT patients_clinic_ssn_bidx_key UNIQUE (clinic_id, ssn_bidx);
-- The blind index says which patients share an SSN: secret in the audit trail like the
-- ciphertext (recorded as changed, never as a value).
DO $$ BEGIN PERFORM audit.enable('public.patients', ARRAY['ssn_bidx'], 'id'); END $$;

-- SSN by role. The application role may not read the ssn column at all (a column grant
-- of everything else): a role that may not see it cannot select, filter, sort or return
-- it, whatever SQL it sends. It reads patients with their ciphertext through
-- patient_records, a view that runs with its owner's rights, hence under the owner's
-- tenant policy (the clinic in context, FORCE), and gives the ciphertext only to doctors
-- and admins, or under emergency access; NULL to nurses, receptionists and no role. One
-- view over the whole row rather than a join of the table with an SSN view, or a
-- function per row: the join's second index scan measured about 10% of a point read.
-- The role is evaluated once per statement (the sub-selects become init plans).
-- A row policy for hcrepo_app on patients must be repeated in this view (below).
REVOKE SELECT ON patients FROM hcrepo_app;
GRANT SELECT (id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email,
              address, ssn_bidx, created_at, updated_at) ON patients TO hcrepo_app;
CREATE VIEW patient_records AS
-- The role in force, looked up once per statement for both rules below (a materialized CTE;
-- two sub-selects would be two look-ups).
WITH scope AS MATERIALIZED (SELECT hcrepo_scope_role() AS role)
SELECT p.id, p.clinic_id, p.mrn, p.first_name, p.last_name, p.date_of_birth, p.sex, p.phone,
       p.email, p.address,
       CASE WHEN scope.role IN ('doctor', 'admin') OR (SELECT hcrepo_emergency())
            THEN p.ssn END AS ssn,
       p.ssn_bidx, p.created_at, p.updated_at
FROM patients AS p CROSS JOIN scope
-- The owner's rights skip hcrepo_app's role policies on patients (0007_staff_roles): the
-- one for reading is repeated here, and the role matrix test checks the view like a table.
WHERE scope.role IN ('doctor', 'nurse', 'admin', 'receptionist', 'clinic');
GRANT SELECT ON patient_records TO hcrepo_app;

-- Each clinic's data keys, wrapped by a master key (version master_version), never in
-- clear. One active version seals new values; every version stays for reading until no
-- value needs it. The application creates a clinic's first key on first use; rotation
-- (`hcrepo keys rotate`, as the owner) adds versions and re-wraps.
CREATE TABLE clinic_data_keys (
    clinic_id      uuid NOT NULL REFERENCES clinics,
    version        integer NOT NULL CHECK (version > 0),
    master_version integer NOT NULL CHECK (master_version > 0),
    wrapped        bytea NOT NULL,
    state          text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (clinic_id, version)
);
CREATE UNIQUE INDEX clinic_data_keys_one_active ON clinic_data_keys (clinic_id)
    WHERE state = 'active';
ALTER TABLE clinic_data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE clinic_data_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON clinic_data_keys FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));
GRANT SELECT, INSERT ON clinic_data_keys TO hcrepo_app;
-- Members of the clinic (and clinic-level jobs) only, like every table of the clinic under
-- the staff role rules (0007_staff_roles): an actor without a membership reaches nothing.
CREATE POLICY clinic_data_keys_members ON clinic_data_keys AS RESTRICTIVE FOR ALL TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IS NOT NULL)
    WITH CHECK ((SELECT hcrepo_scope_role()) IS NOT NULL);

-- Every key rotation, per clinic: started and completed, by whom. Append-only for
-- everyone, the owner included; the application may read its clinic's (no values in it).
CREATE TABLE key_rotations (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    clinic_id          uuid NOT NULL REFERENCES clinics,
    kind               text NOT NULL CHECK (kind IN ('master', 'data')),
    event              text NOT NULL CHECK (event IN ('started', 'completed')),
    from_version       integer,
    to_version         integer NOT NULL,
    values_reencrypted bigint NOT NULL DEFAULT 0,
    run_by             text NOT NULL DEFAULT session_user,
    at                 timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX key_rotations_clinic_idx ON key_rotations (clinic_id, at);
ALTER TABLE key_rotations ENABLE ROW LEVEL SECURITY;
ALTER TABLE key_rotations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON key_rotations FOR ALL TO hcrepo_app, hcrepo_owner
    USING (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid))
    WITH CHECK (clinic_id = (SELECT NULLIF(current_setting('app.clinic_id', true), '')::uuid));
CREATE FUNCTION hcrepo_key_rotations_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    RAISE EXCEPTION 'key_rotations is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER key_rotations_append_only BEFORE UPDATE OR DELETE ON key_rotations
    FOR EACH ROW EXECUTE FUNCTION hcrepo_key_rotations_append_only();
CREATE TRIGGER key_rotations_no_truncate BEFORE TRUNCATE ON key_rotations
    FOR EACH STATEMENT EXECUTE FUNCTION hcrepo_key_rotations_append_only();
GRANT SELECT ON key_rotations TO hcrepo_app;
CREATE POLICY key_rotations_members ON key_rotations AS RESTRICTIVE FOR SELECT TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IS NOT NULL);
