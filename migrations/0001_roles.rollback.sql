DROP EXTENSION IF EXISTS btree_gist;

-- Other databases in the cluster may still grant to hcrepo_app: keep it for them.
DO $$
BEGIN
    DROP ROLE IF EXISTS hcrepo_app;
EXCEPTION WHEN dependent_objects_still_exist THEN
    RAISE NOTICE 'hcrepo_app is still used elsewhere in the cluster; kept';
END
$$;
