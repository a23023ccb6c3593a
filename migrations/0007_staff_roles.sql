-- Minimum necessary: the staff role in force, checked against the clinic membership, shapes
-- what every tenant table returns and accepts; break-glass emergency access, recorded.
-- depends: 0006_audit

-- Where each rule lives:
-- * Row rules are RESTRICTIVE policies for hcrepo_app, one per table and command. They are
--   AND-ed with the permissive tenant policies of 0004/0005, which stay as they are: tenant
--   isolation keeps its own policy, and a table that gains no role policy keeps working
--   for the clinic it belongs to (tests/test_roles.py fails for such a table).
-- * Column grants cannot carry them: hcrepo_app is one database role whatever staff role a
--   request claims. Views per staff role would duplicate every repository's SQL. The one
--   column rule, decrypting an SSN, lives in the decryption path on hcrepo_staff_role().
-- * hcrepo_owner keeps tenant-only policies: it runs migrations and the definer functions
--   below, which read clinic_memberships; a role policy on the owner would recurse.
--
-- The role in force comes from app.role (claimed), app.actor_id and app.clinic_id, all set
-- transaction-locally in hcrepo's one context statement. Written `(SELECT f())`, a policy
-- evaluates the function once per statement (an InitPlan), not once per row.
--
-- The functions the policies call have no SET search_path: a SET clause on a function costs
-- about 25 µs in the first call of every transaction (measured: a SECURITY DEFINER plpgsql
-- function returning a constant, with and without it), a tenth of a point read. They are
-- written to need none instead: every relation and function is schema-qualified, casts name
-- pg_catalog types, and pg_catalog is searched first unless a caller lists it later; the
-- roles that can call them can put objects in no schema at all (no CREATE on the database
-- or on any schema, no temporary objects: 0001, 0005, checked by tests/test_roles.py), so a
-- caller's search_path can only reach the owner's objects.

-- What the policies test: the claimed role if the actor holds it in the clinic (its
-- membership role), else an error; no claim: the actor's membership role; no
-- membership: NULL (no clinical rows). No actor at all is a clinic-level identity (a batch
-- job, `for_each_clinic`): 'clinic', which reads the front desk's scope and writes nothing.
-- Internal: the policies use it, everything else uses hcrepo_staff_role().
CREATE FUNCTION hcrepo_scope_role() RETURNS text
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
AS $$
DECLARE
    clinic pg_catalog.uuid :=
        NULLIF(pg_catalog.current_setting('app.clinic_id', true), '')::pg_catalog.uuid;
    actor pg_catalog.uuid :=
        NULLIF(pg_catalog.current_setting('app.actor_id', true), '')::pg_catalog.uuid;
    claimed pg_catalog.text := NULLIF(pg_catalog.current_setting('app.role', true), '');
    held pg_catalog.text;
BEGIN
    IF clinic IS NULL THEN
        RETURN NULL;
    END IF;
    IF actor IS NULL THEN
        IF claimed IS NOT NULL THEN
            RAISE EXCEPTION 'a staff role is claimed (app.role) without an actor (app.actor_id)'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN 'clinic';
    END IF;
    -- The membership alone: joining users to honour users.active cost a third of the
    -- function's time (a second table to lock and read in every transaction). Taking
    -- database access away is removing the membership; `active` is for the login.
    SELECT m.role INTO held
    FROM public.clinic_memberships AS m
    WHERE m.clinic_id = clinic AND m.user_id = actor;
    IF claimed IS NULL OR claimed = held THEN
        RETURN held;
    END IF;
    -- No values in the message: ids and roles stay out of logs (invariant 7).
    RAISE EXCEPTION 'the actor does not hold the claimed staff role (app.role) in this clinic'
        USING ERRCODE = 'insufficient_privilege';
END
$$;
REVOKE ALL ON FUNCTION hcrepo_scope_role() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hcrepo_scope_role() TO hcrepo_app;

-- The staff role in force for this transaction (doctor, nurse, admin, receptionist), NULL
-- when none: what other rules (SSN decryption) build on.
-- plpgsql rather than sql, here and below: a SECURITY DEFINER sql function is never inlined,
-- and PostgreSQL plans its body again in every statement that calls it; plpgsql keeps the
-- plan for the session.
CREATE FUNCTION hcrepo_staff_role() RETURNS text
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
AS $$
BEGIN
    RETURN NULLIF(public.hcrepo_scope_role(), 'clinic');
END
$$;
REVOKE ALL ON FUNCTION hcrepo_staff_role() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hcrepo_staff_role() TO hcrepo_app;

-- The audit trail records the role in force, not only a claimed one: a change made under
-- the membership role (nothing claimed) shows which role made it.
CREATE OR REPLACE FUNCTION audit.staff_role() RETURNS text
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN public.hcrepo_staff_role();
END
$$;

-- Break-glass uses, append-only. The audit schema may also come from the audit trail's
-- migration; whichever runs first creates it.
CREATE SCHEMA IF NOT EXISTS audit;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO hcrepo_app;

CREATE TABLE audit.emergency_access (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id   uuid NOT NULL REFERENCES public.clinics,
    actor_id    uuid NOT NULL REFERENCES public.users,
    role        text NOT NULL,
    reason      text NOT NULL CHECK (btrim(reason) <> ''),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX emergency_access_clinic_actor_idx
    ON audit.emergency_access (clinic_id, actor_id, recorded_at);
-- hcrepo_app gets nothing on the table: it records through the function below, and reads
-- nothing back (the audit trail's reader role is granted SELECT by its own migration).
REVOKE ALL ON audit.emergency_access FROM PUBLIC, hcrepo_app;

-- Append-only even for the owner's own sessions: no UPDATE, DELETE or TRUNCATE.
CREATE FUNCTION audit.emergency_access_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'audit.emergency_access is append-only'
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER emergency_access_no_change BEFORE UPDATE OR DELETE ON audit.emergency_access
    FOR EACH ROW EXECUTE FUNCTION audit.emergency_access_append_only();
CREATE TRIGGER emergency_access_no_truncate BEFORE TRUNCATE ON audit.emergency_access
    FOR EACH STATEMENT EXECUTE FUNCTION audit.emergency_access_append_only();

-- Records one break-glass for the actor and clinic in context, in the role in force (which
-- must be a clinician's), and returns its id; hcrepo sends it as app.emergency_access_id.
CREATE FUNCTION audit.record_emergency_access(reason text) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    clinic uuid := NULLIF(current_setting('app.clinic_id', true), '')::uuid;
    actor uuid := NULLIF(current_setting('app.actor_id', true), '')::uuid;
    staff_role text := public.hcrepo_staff_role();
    recorded uuid;
BEGIN
    IF clinic IS NULL OR actor IS NULL THEN
        RAISE EXCEPTION 'emergency access needs a clinic (app.clinic_id) and an actor '
                        '(app.actor_id)' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF staff_role IS NULL OR staff_role NOT IN ('doctor', 'nurse') THEN
        RAISE EXCEPTION 'emergency access is for clinicians (doctor, nurse) of this clinic'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'emergency access needs a reason'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO audit.emergency_access (clinic_id, actor_id, role, reason)
    VALUES (clinic, actor, staff_role, btrim(reason))
    RETURNING id INTO recorded;
    RETURN recorded;
END
$$;
REVOKE ALL ON FUNCTION audit.record_emergency_access(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.record_emergency_access(text) TO hcrepo_app;

-- True when the transaction's break-glass is recorded: app.emergency_access_id names a row
-- for this clinic, actor, reason and role in force, recorded within the last four hours (a
-- shift). A reason set without that row widens nothing.
CREATE FUNCTION hcrepo_emergency() RETURNS boolean
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
AS $$
DECLARE
    access pg_catalog.uuid :=
        NULLIF(pg_catalog.current_setting('app.emergency_access_id', true), '')::pg_catalog.uuid;
BEGIN
    IF access IS NULL THEN
        RETURN false;  -- no break-glass claimed: nothing to look up
    END IF;
    RETURN EXISTS (
        SELECT FROM audit.emergency_access AS e
        WHERE e.id = access
          AND e.clinic_id = NULLIF(pg_catalog.current_setting('app.clinic_id', true), '')::pg_catalog.uuid
          AND e.actor_id = NULLIF(pg_catalog.current_setting('app.actor_id', true), '')::pg_catalog.uuid
          AND e.reason = pg_catalog.current_setting('app.emergency_reason', true)
          AND e.recorded_at > pg_catalog.now() - pg_catalog.interval '4 hours'
          AND e.role = public.hcrepo_staff_role()
    );
END
$$;
REVOKE ALL ON FUNCTION hcrepo_emergency() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hcrepo_emergency() TO hcrepo_app;

-- The matrix (tests/test_roles.py declares it and checks every cell as hcrepo_app).
-- 'clinic' is the clinic-level identity (no actor): the front desk's reads, no writes.

-- clinics: the directory stays readable by all and a new clinic registrable by all (it has
-- no members yet); only an admin changes its own clinic.
CREATE POLICY clinics_role_update ON clinics AS RESTRICTIVE FOR UPDATE TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) = 'admin')
    WITH CHECK ((SELECT hcrepo_scope_role()) = 'admin');

-- users and memberships: every member sees the clinic's staff; an admin manages them.
CREATE POLICY users_role_select ON users AS RESTRICTIVE FOR SELECT TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IS NOT NULL);
CREATE POLICY users_role_update ON users AS RESTRICTIVE FOR UPDATE TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) = 'admin')
    WITH CHECK ((SELECT hcrepo_scope_role()) = 'admin');

CREATE POLICY memberships_role_select ON clinic_memberships AS RESTRICTIVE FOR SELECT
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) IS NOT NULL);
CREATE POLICY memberships_role_insert ON clinic_memberships AS RESTRICTIVE FOR INSERT
    TO hcrepo_app WITH CHECK ((SELECT hcrepo_scope_role()) = 'admin');
CREATE POLICY memberships_role_update ON clinic_memberships AS RESTRICTIVE FOR UPDATE
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) = 'admin')
    WITH CHECK ((SELECT hcrepo_scope_role()) = 'admin');
CREATE POLICY memberships_role_delete ON clinic_memberships AS RESTRICTIVE FOR DELETE
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) = 'admin');

-- providers: every member sees the rota; clinicians and admins change it (on call, active);
-- only an admin adds a provider.
CREATE POLICY providers_role_select ON providers AS RESTRICTIVE FOR SELECT TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IS NOT NULL);
CREATE POLICY providers_role_insert ON providers AS RESTRICTIVE FOR INSERT TO hcrepo_app
    WITH CHECK ((SELECT hcrepo_scope_role()) = 'admin');
CREATE POLICY providers_role_update ON providers AS RESTRICTIVE FOR UPDATE TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'admin'))
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'admin'));

-- patients (demographics) and appointments: every staff role reads them; clinicians and the
-- front desk register and book; an admin only reads.
CREATE POLICY patients_role_select ON patients AS RESTRICTIVE FOR SELECT TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'admin', 'receptionist',
                                            'clinic'));
CREATE POLICY patients_role_insert ON patients AS RESTRICTIVE FOR INSERT TO hcrepo_app
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'receptionist'));
CREATE POLICY patients_role_update ON patients AS RESTRICTIVE FOR UPDATE TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'receptionist'))
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'receptionist'));

CREATE POLICY appointments_role_select ON appointments AS RESTRICTIVE FOR SELECT
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'admin',
                                                          'receptionist', 'clinic'));
CREATE POLICY appointments_role_insert ON appointments AS RESTRICTIVE FOR INSERT
    TO hcrepo_app WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse',
                                                               'receptionist'));
CREATE POLICY appointments_role_update ON appointments AS RESTRICTIVE FOR UPDATE
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'receptionist'))
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse', 'receptionist'));

-- encounters (clinical notes): clinicians only. A signed note is every clinician's; a draft
-- (unsigned) is its author's (the provider linked to the actor) until signed, except under
-- a recorded break-glass. Doctors and nurses write notes; only the author amends or signs.
CREATE POLICY encounters_role_select ON encounters AS RESTRICTIVE FOR SELECT TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse') AND (
        signed_at IS NOT NULL
        OR EXISTS (
            SELECT FROM providers AS p
            WHERE p.clinic_id = encounters.clinic_id AND p.id = encounters.provider_id
              AND p.user_id = (SELECT NULLIF(current_setting('app.actor_id', true), '')::uuid)
        )
        OR (SELECT hcrepo_emergency())
    ));
CREATE POLICY encounters_role_insert ON encounters AS RESTRICTIVE FOR INSERT TO hcrepo_app
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse'));
CREATE POLICY encounters_role_update ON encounters AS RESTRICTIVE FOR UPDATE TO hcrepo_app
    USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse') AND EXISTS (
        SELECT FROM providers AS p
        WHERE p.clinic_id = encounters.clinic_id AND p.id = encounters.provider_id
          AND p.user_id = (SELECT NULLIF(current_setting('app.actor_id', true), '')::uuid)
    ))
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse'));

-- prescriptions: clinicians read them; a doctor prescribes; doctors and nurses record
-- refills and status changes.
CREATE POLICY prescriptions_role_select ON prescriptions AS RESTRICTIVE FOR SELECT
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse'));
CREATE POLICY prescriptions_role_insert ON prescriptions AS RESTRICTIVE FOR INSERT
    TO hcrepo_app WITH CHECK ((SELECT hcrepo_scope_role()) = 'doctor');
CREATE POLICY prescriptions_role_update ON prescriptions AS RESTRICTIVE FOR UPDATE
    TO hcrepo_app USING ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse'))
    WITH CHECK ((SELECT hcrepo_scope_role()) IN ('doctor', 'nurse'));

-- Onboarding: an admin onboards staff; a clinic with no members yet onboards its first
-- member (whoever registered it), or nobody could ever act for it.
CREATE OR REPLACE FUNCTION onboard_staff(staff_email text, staff_full_name text, staff_role text)
RETURNS public.users
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    clinic uuid := NULLIF(current_setting('app.clinic_id', true), '')::uuid;
    created public.users;
BEGIN
    IF clinic IS NULL THEN
        RAISE EXCEPTION 'onboard_staff needs a clinic in context (app.clinic_id)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF public.hcrepo_staff_role() IS DISTINCT FROM 'admin' AND EXISTS (
        SELECT FROM public.clinic_memberships AS m WHERE m.clinic_id = clinic
    ) THEN
        RAISE EXCEPTION 'onboard_staff is for the clinic''s admins (or its first member)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO public.users (email, full_name, role)
    VALUES (staff_email, staff_full_name, staff_role)
    RETURNING * INTO created;
    INSERT INTO public.clinic_memberships (clinic_id, user_id, role)
    VALUES (clinic, created.id, staff_role);
    RETURN created;
END
$$;
