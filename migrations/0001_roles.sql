-- Roles and extensions the schema needs.
-- depends:

-- Roles are cluster-wide and several databases may share one cluster, so create the
-- application role only when missing, and refuse one that could bypass row-level security.
DO $$
DECLARE
    existing pg_roles%ROWTYPE;
BEGIN
    SELECT * INTO existing FROM pg_roles WHERE rolname = 'hcrepo_app';
    IF NOT FOUND THEN
        CREATE ROLE hcrepo_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
    ELSIF existing.rolsuper OR existing.rolbypassrls OR existing.rolcreaterole
          OR existing.rolcreatedb OR existing.rolreplication THEN
        RAISE EXCEPTION 'role hcrepo_app exists with privileges that defeat tenant isolation'
            USING HINT = 'ALTER ROLE hcrepo_app NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION';
    END IF;
END
$$;

-- PostgreSQL 14 and older let every role create objects in public; nobody but the owner may.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Trusted extension (no superuser needed): equality on uuid inside GiST exclusion constraints.
CREATE EXTENSION IF NOT EXISTS btree_gist;
