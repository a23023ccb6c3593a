-- The triggers on the PHI tables go with the function they call.
DROP TRIGGER audit_insert ON patients;
DROP TRIGGER audit_update ON patients;
DROP TRIGGER audit_delete ON patients;
DROP TRIGGER audit_truncate ON patients;
DROP TRIGGER audit_fixed_key ON patients;
DROP TRIGGER audit_insert ON appointments;
DROP TRIGGER audit_update ON appointments;
DROP TRIGGER audit_delete ON appointments;
DROP TRIGGER audit_truncate ON appointments;
DROP TRIGGER audit_fixed_key ON appointments;
DROP TRIGGER audit_insert ON encounters;
DROP TRIGGER audit_update ON encounters;
DROP TRIGGER audit_delete ON encounters;
DROP TRIGGER audit_truncate ON encounters;
DROP TRIGGER audit_fixed_key ON encounters;
DROP TRIGGER audit_insert ON prescriptions;
DROP TRIGGER audit_update ON prescriptions;
DROP TRIGGER audit_delete ON prescriptions;
DROP TRIGGER audit_truncate ON prescriptions;
DROP TRIGGER audit_fixed_key ON prescriptions;

-- Takes the row type of audit.changes.
DROP FUNCTION audit.canonical(audit.changes);
DROP TABLE audit.changes;
DROP TABLE audit.chain;
DROP TABLE audit.access_log;
DROP TABLE audit.auditor_log;
DROP TABLE audit.purges;
-- The sealer's progress and the list of audited tables always hold a row: the schema takes
-- them, so that only the tables above make a rollback ask first.
DROP SCHEMA audit CASCADE;

-- Other databases in the cluster may still grant to hcrepo_auditor: keep it for them.
DO $$
BEGIN
    DROP ROLE IF EXISTS hcrepo_auditor;
EXCEPTION WHEN dependent_objects_still_exist THEN
    RAISE NOTICE 'hcrepo_auditor is still used elsewhere in the cluster; kept';
END
$$;
