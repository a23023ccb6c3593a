-- Placeholder on the access log's branch: just the access log table its tests write to.
-- The audit migration (schema, append-only rules, partitions, retention) replaces this file.
-- depends: 0005_staff_and_session_state

CREATE SCHEMA audit;

CREATE TABLE audit.access_log (
    recorded_at     timestamptz NOT NULL,      -- when the read happened (client side)
    logged_at       timestamptz NOT NULL DEFAULT now(),
    actor_id        uuid,                      -- reads may run without an actor
    clinic_id       uuid NOT NULL,
    staff_role      text,
    query           text NOT NULL,             -- the query name, never SQL or values
    patient_ids     uuid[] NOT NULL,
    source          text NOT NULL,             -- 'primary', 'replica:<name>' or 'cache'
    emergency_reason text
) PARTITION BY RANGE (recorded_at);

DO $$
DECLARE
    first date := (date_trunc('month', now()) - interval '2 months')::date;
    month date;
BEGIN
    FOR step IN 0..5 LOOP
        month := (first + make_interval(months => step))::date;
        EXECUTE format(
            'CREATE TABLE audit.%I PARTITION OF audit.access_log FOR VALUES FROM (%L) TO (%L)',
            'access_log_' || to_char(month, 'YYYY_MM'), month,
            (month + interval '1 month')::date);
    END LOOP;
END
$$;
CREATE TABLE audit.access_log_default PARTITION OF audit.access_log DEFAULT;

GRANT USAGE ON SCHEMA audit TO hcrepo_app;
GRANT INSERT ON audit.access_log TO hcrepo_app;
