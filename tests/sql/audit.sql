-- Test-only writes for the audit trail tests.

-- name: bulk_patients
INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex)
SELECT current_setting('app.clinic_id')::uuid, :prefix || g, 'Bulk', 'Patient',
       DATE '1990-01-01' + (g % 9000), 'unknown'
FROM generate_series(1, :count) AS g

-- name: audit_trigger_calls
-- Calls of the audit trigger function so far in this transaction (track_functions = pl).
SELECT coalesce(sum(calls), 0)::int FROM pg_stat_xact_user_functions
WHERE schemaname = 'audit' AND funcname = 'record'
