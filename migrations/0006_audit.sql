-- The write-audit trail of PHI tables, its hash chain, the PHI access log and the auditor.
-- depends: 0005_staff_and_session_state

-- hcrepo_auditor reads the audit schema across clinics and nothing else. Created NOLOGIN
-- when missing; `hcrepo bootstrap` with HCREPO_AUDITOR_PASSWORD gives it a login, like the
-- application role. A role that could read past row-level security is refused.
DO $$
DECLARE
    existing pg_roles%ROWTYPE;
BEGIN
    SELECT * INTO existing FROM pg_roles WHERE rolname = 'hcrepo_auditor';
    IF NOT FOUND THEN
        CREATE ROLE hcrepo_auditor NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
            NOREPLICATION;
    ELSIF existing.rolsuper OR existing.rolbypassrls OR existing.rolcreaterole
          OR existing.rolcreatedb OR existing.rolreplication THEN
        RAISE EXCEPTION 'role hcrepo_auditor exists with privileges that defeat tenant isolation'
            USING HINT = 'ALTER ROLE hcrepo_auditor NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION';
    END IF;
END
$$;

CREATE SCHEMA audit;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO hcrepo_app, hcrepo_auditor;

-- One row per changed row. Never updated: the chain lives beside it (audit.chain), so a
-- writer never waits for another writer's link. `at` is the statement's start, `txid` the
-- writing transaction; `db_role` is the login role (the application, or a maintenance role).
CREATE SEQUENCE audit.changes_id_seq AS bigint;
CREATE TABLE audit.changes (
    id          bigint NOT NULL DEFAULT nextval('audit.changes_id_seq'),
    at          timestamptz NOT NULL DEFAULT statement_timestamp(),
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    actor_id    uuid,
    clinic_id   uuid NOT NULL,
    staff_role  text,
    db_role     text NOT NULL DEFAULT session_user,
    action      text NOT NULL CHECK (action IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'PURGE')),
    table_name  text NOT NULL,
    row_id      text,
    patient_id  uuid,
    changed     text[] NOT NULL DEFAULT '{}',
    old         jsonb,
    new         jsonb
) PARTITION BY RANGE (at);
ALTER SEQUENCE audit.changes_id_seq OWNED BY audit.changes.id;
-- BRIN, not btree: ids grow with time, and a bulk write pays one summary per range of
-- pages instead of one btree entry per row; the sealer scans only the newest ranges.
CREATE INDEX changes_id_idx ON audit.changes USING brin (id);
CREATE INDEX changes_patient_idx ON audit.changes (patient_id, at);

-- The per-clinic hash chain, appended by audit.seal only. hash = sha256 over the link's
-- clinic and seq, the change's canonical content (audit.canonical) and prev_hash.
CREATE TABLE audit.chain (
    clinic_id   uuid NOT NULL,
    seq         bigint NOT NULL,
    change_id   bigint NOT NULL,
    sealed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL
) PARTITION BY RANGE (sealed_at);
CREATE INDEX chain_clinic_seq_idx ON audit.chain (clinic_id, seq);
CREATE INDEX chain_change_idx ON audit.chain (change_id);

-- Every PHI read (written by the application's access-log recorder, COPY in batches).
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
CREATE INDEX access_log_patients_idx ON audit.access_log USING gin (patient_ids);

-- What the auditor role did through hcrepo (trail, verify, digest), written by
-- audit.log_auditor. Small and kept: not partitioned, never purged.
CREATE TABLE audit.auditor_log (
    at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    db_role  text NOT NULL DEFAULT session_user,
    command  text NOT NULL,
    args     jsonb NOT NULL DEFAULT '{}'
);

-- A retention purge: per clinic chain, the last link it made unverifiable. Verification of
-- that chain starts after boundary_seq, from boundary_hash. change_id is the PURGE row in
-- audit.changes that records the purge itself (and is chained like any change).
CREATE TABLE audit.purges (
    purged_at     timestamptz NOT NULL DEFAULT statement_timestamp(),
    table_name    text NOT NULL,
    partition     text NOT NULL,
    clinic_id     uuid,
    boundary_seq  bigint,
    boundary_hash bytea,
    rows          bigint NOT NULL,
    change_id     bigint NOT NULL
);

-- The sealer's progress: every change id below `horizon` is sealed or was rolled back.
-- A checkpoint (seq, xmax) becomes a new horizon once every transaction that could hold an
-- id up to `seq` has ended (the snapshot's xmin has passed `xmax`).
CREATE TABLE audit.seal_state (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    horizon         bigint NOT NULL DEFAULT 1,
    checkpoint_seq  bigint,
    checkpoint_xmax xid8
);
INSERT INTO audit.seal_state DEFAULT VALUES;

-- Which tables are audited and which of their columns are secret (never stored in clear).
CREATE TABLE audit.tables (
    relid    regclass PRIMARY KEY,
    secrets  text[] NOT NULL DEFAULT '{}',
    patient  text NOT NULL
);

-- The system chain (purges) uses the nil clinic.
-- Append-only: no role updates or deletes a row, the owner included; dropping a whole
-- partition (audit.purge) is the one sanctioned removal. A superuser can disable the
-- triggers; the chain and an outside digest catch what it then changes.
CREATE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'audit table %.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['changes', 'chain', 'access_log', 'auditor_log', 'purges'] LOOP
        EXECUTE format('CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON audit.%I '
                       'FOR EACH ROW EXECUTE FUNCTION audit.refuse_change()', t);
        EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change()', t);
    END LOOP;
END
$$;

-- One partition of `parent` (changes, chain or access_log) for the month holding `day`.
-- A TRUNCATE of the partition itself is refused too (statement triggers are not cloned).
CREATE FUNCTION audit.create_partition(parent text, day date) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    low date := date_trunc('month', day)::date;
    -- Bounds in UTC whatever the session's TimeZone, so that names and ranges agree.
    low_at timestamptz := low::timestamp AT TIME ZONE 'UTC';
    name text := format('%s_p%s', parent, to_char(low, 'YYYYMM'));
BEGIN
    IF parent NOT IN ('changes', 'chain', 'access_log') THEN
        RAISE EXCEPTION 'audit.create_partition: % is not a partitioned audit table', parent;
    END IF;
    IF to_regclass(format('audit.%I', name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE audit.%I PARTITION OF audit.%I FOR VALUES FROM (%L) TO (%L)',
                   name, parent, low_at, (low + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change()', name);
    EXECUTE format('REVOKE ALL ON audit.%I FROM PUBLIC', name);
    EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON audit.%I FROM hcrepo_owner', name);
    RETURN true;
END
$$;

-- Monthly partitions from this month to `months_ahead` months ahead; returns how many it
-- made. Called by this migration, by every seal run of the sealer thread's start and of
-- `hcrepo audit seal`, and by retention. Rows that fall outside every partition (a client
-- clock years off) land in the DEFAULT partition instead of failing; a month whose rows sit
-- in DEFAULT is skipped (PostgreSQL would refuse the new partition) and stays in DEFAULT.
CREATE FUNCTION audit.ensure_partitions(months_ahead integer DEFAULT 3) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent text;
    column_name text;
    month date;
    made integer := 0;
    crowded boolean;
BEGIN
    IF months_ahead NOT BETWEEN 0 AND 24 THEN
        RAISE EXCEPTION 'audit.ensure_partitions: months_ahead must be 0 to 24';
    END IF;
    FOR parent, column_name IN
        VALUES ('changes', 'at'), ('chain', 'sealed_at'), ('access_log', 'recorded_at')
    LOOP
        FOR i IN 0..months_ahead LOOP
            month := (date_trunc('month', now() AT TIME ZONE 'UTC')
                      + make_interval(months => i))::date;
            CONTINUE WHEN to_regclass(format('audit.%s_p%s', parent, to_char(month, 'YYYYMM')))
                IS NOT NULL;
            EXECUTE format('SELECT EXISTS (SELECT FROM audit.%I WHERE %I >= %L AND %I < %L)',
                           parent || '_default', column_name, month::timestamp AT TIME ZONE 'UTC',
                           column_name, (month + interval '1 month')::timestamp AT TIME ZONE 'UTC')
                INTO crowded;
            CONTINUE WHEN crowded;
            IF audit.create_partition(parent, month) THEN
                made := made + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

CREATE TABLE audit.changes_default PARTITION OF audit.changes DEFAULT;
CREATE TABLE audit.chain_default PARTITION OF audit.chain DEFAULT;
CREATE TABLE audit.access_log_default PARTITION OF audit.access_log DEFAULT;
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit.changes_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit.chain_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit.access_log_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
DO $$ BEGIN PERFORM audit.ensure_partitions(3); END $$;

-- Who may write without an actor: a superuser (who could disable the triggers anyway) and
-- a member of hcrepo_owner (migrations, retention). Their rows carry their db_role.
CREATE FUNCTION audit.maintenance_session() RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = session_user), false)
        OR pg_has_role(session_user, 'hcrepo_owner', 'MEMBER')
$$;

-- The staff role a change is recorded with: the claimed one here; the staff role rules
-- (0007_staff_roles) replace it with the role in force, checked against the membership.
-- plpgsql with every name qualified and no SET clause, like audit.record below: called
-- from the trigger, a SET clause here (or there) makes the role functions plan their
-- queries again on every call (cached plans depend on the search_path).
CREATE FUNCTION audit.staff_role() RETURNS text
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN nullif(pg_catalog.current_setting('app.role', true), '');
END
$$;

-- The statement-level trigger of every audited table: one INSERT ... SELECT per statement
-- from the transition tables, however many rows it changed. TG_ARGV: primary-key column,
-- patient column, the secret columns' marker object. SECURITY DEFINER: the application role cannot
-- write audit.changes itself.
CREATE FUNCTION audit.record() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
-- No SET search_path (it cost ~200 us per write: see audit.staff_role): relations, types
-- and the functions it calls are schema-qualified; operators and built-in functions resolve
-- in pg_catalog, and hcrepo_app can create objects in no schema and no temporary ones (0005,
-- tested), so no search_path it sets can put its own objects before them (the other roles
-- whose writes fire this, the owner and superusers, own it anyway).
AS $$
DECLARE
    actor pg_catalog.uuid :=
        nullif(pg_catalog.current_setting('app.actor_id', true), '')::pg_catalog.uuid;
    staff pg_catalog.text := audit.staff_role();
    key pg_catalog.text := TG_ARGV[0];
    patient pg_catalog.text := TG_ARGV[1];
    -- A secret column's value never enters the trail, null or not: it shows as "[secret]",
    -- so the trail says the column was written or changed, never what it held. The marker
    -- object ({"ssn": "[secret]", ...}) is made by audit.enable and laid over each row with
    -- one jsonb concatenation: a masking function called per row tripled a bulk insert.
    marker pg_catalog.jsonb := TG_ARGV[2]::pg_catalog.jsonb;
    masking boolean := marker OPERATOR(pg_catalog.<>) '{}'::pg_catalog.jsonb;
    wrote boolean;
    columns pg_catalog.text[];
BEGIN
    -- A statement that changed no row wrote nothing: it needs no actor (another clinic's
    -- rows are invisible, so an UPDATE of them is a no-op, not a refusal). Each transition
    -- table exists only for its own operations, hence one query per branch.
    IF actor IS NULL THEN
        IF TG_OP = 'TRUNCATE' THEN
            wrote := true;
        ELSIF TG_OP = 'DELETE' THEN
            wrote := EXISTS (SELECT FROM old_rows);
        ELSE
            wrote := EXISTS (SELECT FROM new_rows);
        END IF;
        IF wrote AND NOT audit.maintenance_session() THEN
            RAISE EXCEPTION 'a write to % needs an actor: app.actor_id is not set',
                TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'DELETE') THEN
        columns := ARRAY(SELECT attname::pg_catalog.text FROM pg_catalog.pg_attribute
                         WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped
                         ORDER BY attnum);
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit.changes (actor_id, clinic_id, staff_role, action, table_name, row_id,
                                   patient_id, changed, old, new)
        SELECT actor, (r.j ->> 'clinic_id')::uuid, staff, 'INSERT', TG_TABLE_NAME, r.j ->> key,
               (r.j ->> patient)::uuid, columns, NULL,
               CASE WHEN masking THEN r.j || marker ELSE r.j END
        FROM (SELECT to_jsonb(n) AS j FROM new_rows AS n) AS r;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO audit.changes (actor_id, clinic_id, staff_role, action, table_name, row_id,
                                   patient_id, changed, old, new)
        SELECT actor, (r.j ->> 'clinic_id')::uuid, staff, 'DELETE', TG_TABLE_NAME, r.j ->> key,
               (r.j ->> patient)::uuid, columns,
               CASE WHEN masking THEN r.j || marker ELSE r.j END, NULL
        FROM (SELECT to_jsonb(o) AS j FROM old_rows AS o) AS r;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old and new rows pair up by primary key, which never changes on an audited table
        -- (audit.refuse_key_change). An inner join: a FULL JOIN, needed only if keys could
        -- change, cost a third of the trigger. Only the changed columns are kept.
        INSERT INTO audit.changes (actor_id, clinic_id, staff_role, action, table_name, row_id,
                                   patient_id, changed, old, new)
        SELECT actor, (p.nj ->> 'clinic_id')::uuid, staff, 'UPDATE', TG_TABLE_NAME,
               p.nj ->> key, (p.nj ->> patient)::uuid, d.changed, d.o, d.n
        FROM (SELECT o.j AS oj, n.j AS nj
              FROM (SELECT to_jsonb(t) AS j FROM old_rows AS t) AS o
              JOIN (SELECT to_jsonb(t) AS j FROM new_rows AS t) AS n
                ON o.j -> key = n.j -> key) AS p
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(e.key ORDER BY e.key), '{}') AS changed,
                   coalesce(jsonb_object_agg(e.key,
                       CASE WHEN marker ? e.key THEN marker -> e.key ELSE p.oj -> e.key END
                   ), '{}') AS o,
                   coalesce(jsonb_object_agg(e.key,
                       CASE WHEN marker ? e.key THEN marker -> e.key ELSE e.value END
                   ), '{}') AS n
            FROM jsonb_each(p.nj) AS e
            WHERE e.value IS DISTINCT FROM p.oj -> e.key
        ) AS d;
    ELSE  -- TRUNCATE (the owner's; the application role has no TRUNCATE)
        INSERT INTO audit.changes (actor_id, clinic_id, staff_role, action, table_name)
        VALUES (actor, coalesce(nullif(current_setting('app.clinic_id', true), '')::uuid,
                                '00000000-0000-0000-0000-000000000000'),
                staff, 'TRUNCATE', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;

-- An audited row keeps its primary key: the trail pairs a row's old and new versions by it
-- (and a PHI record that changed identity would be hard to follow). A row trigger on
-- `UPDATE OF <key>` only, so other updates never call it.
CREATE FUNCTION audit.refuse_key_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'the primary key of an audited row never changes (%)', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Marks a table as audited PHI: one call per table, in a migration. `secret_columns` are
-- added to those already marked (a later migration adds encrypted columns the same way);
-- `patient_column` names the patient a row belongs to (the key itself for patients).
CREATE FUNCTION audit.enable(target regclass, secret_columns text[] DEFAULT '{}',
                             patient_column text DEFAULT 'patient_id') RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text;
    merged text[];
    missing text;
    args text;
BEGIN
    SELECT a.attname INTO key
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = target AND i.indisprimary AND i.indnkeyatts = 1;
    IF key IS NULL THEN
        RAISE EXCEPTION 'audit.enable: % has no single-column primary key', target;
    END IF;
    SELECT ARRAY(SELECT DISTINCT s FROM unnest(coalesce(t.secrets, '{}') || secret_columns) AS s
                 ORDER BY s)
    INTO merged
    FROM (SELECT) AS one LEFT JOIN audit.tables AS t ON t.relid = target;
    SELECT c INTO missing FROM unnest(ARRAY[patient_column, 'clinic_id'] || merged) AS c
    WHERE NOT EXISTS (SELECT FROM pg_attribute
                      WHERE attrelid = target AND attname = c AND attnum > 0 AND NOT attisdropped)
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'audit.enable: % has no column %', target, missing;
    END IF;

    args := format('%L, %L, %L', key, patient_column,
                   (SELECT coalesce(jsonb_object_agg(s, '[secret]'::text), '{}')
                    FROM unnest(merged) AS s)::text);
    EXECUTE format('DROP TRIGGER IF EXISTS audit_insert ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS audit_update ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS audit_delete ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS audit_truncate ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS audit_fixed_key ON %s', target);
    EXECUTE format('CREATE TRIGGER audit_fixed_key BEFORE UPDATE OF %I ON %s FOR EACH ROW '
                   'WHEN (OLD.%I IS DISTINCT FROM NEW.%I) '
                   'EXECUTE FUNCTION audit.refuse_key_change()', key, target, key, key);
    EXECUTE format('CREATE TRIGGER audit_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS '
                   'new_rows FOR EACH STATEMENT EXECUTE FUNCTION audit.record(%s)', target, args);
    EXECUTE format('CREATE TRIGGER audit_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS '
                   'old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION audit.record(%s)', target, args);
    EXECUTE format('CREATE TRIGGER audit_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS '
                   'old_rows FOR EACH STATEMENT EXECUTE FUNCTION audit.record(%s)', target, args);
    EXECUTE format('CREATE TRIGGER audit_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION audit.record(%s)', target, args);
    INSERT INTO audit.tables (relid, secrets, patient)
    VALUES (target, merged, patient_column)
    ON CONFLICT (relid) DO UPDATE SET secrets = EXCLUDED.secrets, patient = EXCLUDED.patient;
END
$$;

-- (DO blocks: yoyo prints the result of a top-level SELECT.)
DO $$
BEGIN
    PERFORM audit.enable('public.patients', ARRAY['ssn'], 'id');
    PERFORM audit.enable('public.appointments');
    PERFORM audit.enable('public.encounters');
    PERFORM audit.enable('public.prescriptions');
END
$$;

-- The canonical content of a change, hashed by the sealer and recomputed by
-- hcrepo.compliance.chain (which must list the same fields, in the same order, with the same
-- text forms): each field as "<bytes>:<text>;", a NULL as "~;".
CREATE FUNCTION audit.canonical(c audit.changes) RETURNS bytea
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT convert_to(string_agg(CASE WHEN f IS NULL THEN '~;'
                                      ELSE octet_length(f)::text || ':' || f || ';' END,
                                 '' ORDER BY n), 'UTF8')
    FROM unnest(ARRAY[
        c.id::text,
        to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        c.txid::text, c.actor_id::text, c.clinic_id::text, c.staff_role, c.db_role, c.action,
        c.table_name, c.row_id, c.patient_id::text, c.changed::text, c.old::text, c.new::text
    ]) WITH ORDINALITY AS t(f, n)
$$;

CREATE FUNCTION audit.link_hash(clinic uuid, seq bigint, content bytea, prev bytea) RETURNS bytea
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(convert_to(clinic::text || '|' || seq::text || '|', 'UTF8') || content || prev)
$$;

-- Links committed, unsealed changes into their clinic's chain, oldest id first, at most
-- `max_rows`; returns how many. One sealer at a time (a second caller returns 0 at once);
-- writers never wait for it, it never waits for writers.
CREATE FUNCTION audit.seal(max_rows integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    state audit.seal_state;
    seen bigint;
    snap pg_snapshot;
    ready boolean;
    c audit.changes;
    clinic uuid;
    head_seq bigint;
    head_hash bytea;
    clinics uuid[] := '{}';
    seqs bigint[] := '{}';
    ids bigint[] := '{}';
    prevs bytea[] := '{}';
    hashes bytea[] := '{}';
    sealed integer := 0;
BEGIN
    IF max_rows < 1 THEN
        RAISE EXCEPTION 'audit.seal: max_rows must be at least 1';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('hcrepo audit.seal')) THEN
        RETURN 0;
    END IF;
    SELECT * INTO STRICT state FROM audit.seal_state;
    -- Read the sequence first, then the snapshot: any id up to `seen` was taken by a
    -- transaction whose xid is below this snapshot's xmax (the xid exists before the row
    -- that fires the trigger is written).
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO seen FROM audit.changes_id_seq;
    snap := pg_current_snapshot();
    ready := state.checkpoint_xmax IS NOT NULL AND pg_snapshot_xmin(snap) >= state.checkpoint_xmax;
    -- The query below runs on a later snapshot, which sees every transaction `ready` saw end.
    FOR c IN
        SELECT ch.* FROM audit.changes AS ch
        WHERE ch.id >= state.horizon
          AND NOT EXISTS (SELECT FROM audit.chain AS k WHERE k.change_id = ch.id)
        ORDER BY ch.clinic_id, ch.id
        LIMIT max_rows
    LOOP
        IF clinic IS DISTINCT FROM c.clinic_id THEN
            clinic := c.clinic_id;
            head_seq := NULL;
            head_hash := NULL;
            SELECT k.seq, k.hash INTO head_seq, head_hash FROM audit.chain AS k
            WHERE k.clinic_id = clinic ORDER BY k.seq DESC LIMIT 1;
            head_seq := coalesce(head_seq, 0);
            head_hash := coalesce(head_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
        END IF;
        clinics := clinics || clinic;
        ids := ids || c.id;
        prevs := prevs || head_hash;
        head_seq := head_seq + 1;
        head_hash := audit.link_hash(clinic, head_seq, audit.canonical(c), head_hash);
        seqs := seqs || head_seq;
        hashes := hashes || head_hash;
        sealed := sealed + 1;
    END LOOP;
    IF sealed > 0 THEN
        INSERT INTO audit.chain (clinic_id, seq, change_id, prev_hash, hash)
        SELECT * FROM unnest(clinics, seqs, ids, prevs, hashes);
    END IF;
    -- Every visible change at or past the horizon is now sealed unless the limit cut the
    -- batch short; only then may the horizon move to a checkpoint whose writers all ended.
    IF sealed < max_rows AND ready THEN
        state.horizon := greatest(state.horizon, state.checkpoint_seq + 1);
        state.checkpoint_xmax := NULL;
    END IF;
    IF state.checkpoint_xmax IS NULL THEN
        state.checkpoint_seq := seen;
        state.checkpoint_xmax := pg_snapshot_xmax(snap);
    END IF;
    UPDATE audit.seal_state AS s
    SET horizon = state.horizon, checkpoint_seq = state.checkpoint_seq,
        checkpoint_xmax = state.checkpoint_xmax;
    RETURN sealed;
END
$$;

-- The auditor's own use, logged from inside its transaction (it has no INSERT anywhere).
CREATE FUNCTION audit.log_auditor(command text, args jsonb DEFAULT '{}') RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO audit.auditor_log (command, args) VALUES (command, coalesce(args, '{}'))
$$;

-- Retention: the partitions of `parent` (changes or access_log) that lie wholly before
-- `cutoff`, with their row counts; with `apply`, each is detached and dropped, the chain
-- partitions made wholly before the cutoff with them, and the purge recorded in
-- audit.purges and, as a PURGE change, in the system chain. The owner's only; the function
-- seals first so that the boundary of every clinic chain is known.
CREATE FUNCTION audit.purge(parent text, cutoff timestamptz, apply boolean)
RETURNS TABLE (partition text, range_start timestamptz, range_end timestamptz, row_count bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    purge_id bigint;
    boundaries jsonb;
BEGIN
    IF parent NOT IN ('changes', 'access_log') THEN
        RAISE EXCEPTION 'audit.purge: % is not a retained audit table', parent;
    END IF;
    FOR partition, range_start IN
        SELECT c.relname::text,
               to_date(substr(c.relname, length(parent) + 3), 'YYYYMM')::timestamp AT TIME ZONE 'UTC'
        FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = format('audit.%I', parent)::regclass
          AND c.relname ~ ('^' || parent || '_p[0-9]{6}$')
        ORDER BY c.relname
    LOOP
        range_end := range_start + interval '1 month';
        CONTINUE WHEN range_end > cutoff;
        EXECUTE format('SELECT count(*) FROM audit.%I', partition) INTO row_count;
        IF apply THEN
            IF parent = 'changes' THEN
                -- Wait for a running sealer, then hold its lock to the end: every change of
                -- the partition is linked before the boundary is read, and none after.
                PERFORM pg_advisory_xact_lock(hashtext('hcrepo audit.seal'));
                WHILE audit.seal(10000) > 0 LOOP END LOOP;
                EXECUTE format(
                    'SELECT coalesce(jsonb_object_agg(b.clinic_id, b.seq), ''{}'') FROM '
                    '(SELECT k.clinic_id, max(k.seq) AS seq FROM audit.chain AS k '
                    ' JOIN audit.%I AS ch ON ch.id = k.change_id GROUP BY k.clinic_id) AS b',
                    partition) INTO boundaries;
            END IF;
            INSERT INTO audit.changes (clinic_id, action, table_name, row_id, changed, new)
            VALUES ('00000000-0000-0000-0000-000000000000', 'PURGE', 'audit.' || parent,
                    partition, '{}',
                    jsonb_build_object('partition', partition, 'rows', row_count,
                                       'range_start', range_start, 'range_end', range_end,
                                       'boundaries', boundaries))
            RETURNING id INTO purge_id;
            IF parent = 'changes' THEN
                INSERT INTO audit.purges (table_name, partition, clinic_id, boundary_seq,
                                          boundary_hash, rows, change_id)
                SELECT 'audit.changes', partition, b.key::uuid, b.value::bigint, k.hash,
                       row_count, purge_id
                FROM jsonb_each_text(boundaries) AS b
                JOIN audit.chain AS k ON k.clinic_id = b.key::uuid AND k.seq = b.value::bigint;
            ELSE
                INSERT INTO audit.purges (table_name, partition, rows, change_id)
                VALUES ('audit.access_log', partition, row_count, purge_id);
            END IF;
            EXECUTE format('ALTER TABLE audit.%I DETACH PARTITION audit.%I', parent, partition);
            EXECUTE format('DROP TABLE audit.%I', partition);
        END IF;
        RETURN NEXT;
    END LOOP;
    -- Chain partitions sealed wholly before the cutoff only hold links of changes older than
    -- it (a change is sealed after it is written), whose boundaries are recorded above.
    IF apply AND parent = 'changes' THEN
        FOR partition IN
            SELECT c.relname::text FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'audit.chain'::regclass AND c.relname ~ '^chain_p[0-9]{6}$'
              AND (to_date(substr(c.relname, 8), 'YYYYMM') + interval '1 month')::timestamp
                  AT TIME ZONE 'UTC' <= cutoff
        LOOP
            EXECUTE format('ALTER TABLE audit.chain DETACH PARTITION audit.%I', partition);
            EXECUTE format('DROP TABLE audit.%I', partition);
        END LOOP;
    END IF;
    PERFORM audit.ensure_partitions(3);
END
$$;

-- Privileges. Functions are executable by PUBLIC unless revoked; tables grant nothing.
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC;
-- The owner keeps INSERT (the definer functions write as it) and SELECT, nothing else.
REVOKE UPDATE, DELETE, TRUNCATE ON audit.changes, audit.chain, audit.access_log,
    audit.auditor_log, audit.purges FROM hcrepo_owner;
DO $$
DECLARE
    p text;
BEGIN
    FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'audit' AND c.relkind = 'r' LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON audit.%I FROM hcrepo_owner', p);
    END LOOP;
END
$$;
GRANT INSERT ON audit.access_log TO hcrepo_app;
GRANT EXECUTE ON FUNCTION audit.seal(integer), audit.ensure_partitions(integer) TO hcrepo_app;
GRANT SELECT ON audit.changes, audit.chain, audit.access_log, audit.auditor_log, audit.purges,
    audit.tables, audit.seal_state TO hcrepo_auditor;
GRANT EXECUTE ON FUNCTION audit.log_auditor(text, jsonb) TO hcrepo_auditor;
