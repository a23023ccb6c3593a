-- Undo 0008_field_encryption. Ciphertexts cannot be decrypted here (the keys never reach
-- the database): the rollback refuses while any patient has an encrypted SSN, rather than
-- drop them; plaintext SSNs still waiting aside go back to their rows.

ALTER TABLE patients NO FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF EXISTS (SELECT FROM patients WHERE ssn IS NOT NULL) THEN
        RAISE EXCEPTION 'patients hold encrypted SSNs, which this rollback would lose'
            USING ERRCODE = 'object_in_use',
                  HINT = 'to lose them on purpose: UPDATE patients SET ssn = NULL, ssn_bidx = NULL';
    END IF;
END
$$;

DROP TABLE key_rotations;
DROP FUNCTION hcrepo_key_rotations_append_only();
DROP TABLE clinic_data_keys;

DROP VIEW patient_records;
REVOKE SELECT (id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email,
               address, ssn_bidx, created_at, updated_at) ON patients FROM hcrepo_app;
GRANT SELECT ON patients TO hcrepo_app;

ALTER TABLE patients DROP CONSTRAINT patients_clinic_ssn_bidx_key;
ALTER TABLE patients DROP CONSTRAINT patients_ssn_has_bidx;
ALTER TABLE patients DROP CONSTRAINT patients_ssn_bidx_is_hmac;
ALTER TABLE patients DROP CONSTRAINT patients_ssn_is_ciphertext;
UPDATE audit.tables SET secrets = array_remove(secrets, 'ssn_bidx')
WHERE relid = 'public.patients'::regclass;
DO $$ BEGIN PERFORM audit.enable('public.patients', '{}', 'id'); END $$;
ALTER TABLE patients DROP COLUMN ssn_bidx;

ALTER TABLE patients_plaintext_ssn NO FORCE ROW LEVEL SECURITY;  -- every clinic's, here
UPDATE patients AS p SET ssn = aside.ssn
FROM patients_plaintext_ssn AS aside
WHERE aside.patient_id = p.id;
ALTER TABLE patients FORCE ROW LEVEL SECURITY;
DROP TABLE patients_plaintext_ssn;
