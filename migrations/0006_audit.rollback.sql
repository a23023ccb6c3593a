-- Placeholder on the access log's branch (see 0006_audit.sql).
DROP TABLE audit.access_log;
DROP SCHEMA audit;
