-- Test-only queries that need no clinic: the session as the server sees it, the directory,
-- and the commit probe table that tests/test_transactions.py creates and drops.

-- name: probe
SELECT current_setting('app.clinic_id', true) AS clinic,
       current_setting('app.actor_id', true) AS actor,
       current_user::text AS role,
       current_setting('row_security') AS row_security,
       current_setting('transaction_isolation') AS isolation,
       current_setting('transaction_read_only') AS read_only,
       current_setting('statement_timeout') AS statement_timeout,
       pg_backend_pid() AS pid

-- name: clinic_ids
SELECT id FROM clinics ORDER BY id

-- name: add_mark
INSERT INTO hcrepo_test_marks (mark) VALUES (:mark)

-- name: count_marks
SELECT count(*) FROM hcrepo_test_marks WHERE mark = :mark

-- name: probe_with_timeout
-- timeout: 1234ms
SELECT current_setting('app.clinic_id', true) AS clinic,
       current_setting('app.actor_id', true) AS actor,
       current_user::text AS role,
       current_setting('row_security') AS row_security,
       current_setting('transaction_isolation') AS isolation,
       current_setting('transaction_read_only') AS read_only,
       current_setting('statement_timeout') AS statement_timeout,
       pg_backend_pid() AS pid
