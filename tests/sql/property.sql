-- Test-only queries of tests/test_api_property.py over hcrepo_prop.items, a tenant table
-- (clinic_id, ENABLE + FORCE row-level security) that the test module creates and drops.
-- The item reads are one SELECT under three names so that each has its own cache entries.

-- name: prop_item
SELECT clinic_id, id, value, writes FROM hcrepo_prop.items WHERE id = :id

-- name: prop_item_tagged
SELECT clinic_id, id, value, writes FROM hcrepo_prop.items WHERE id = :id

-- name: prop_item_untagged
SELECT clinic_id, id, value, writes FROM hcrepo_prop.items WHERE id = :id

-- name: prop_items
SELECT clinic_id, id, value, writes FROM hcrepo_prop.items WHERE batch = :batch ORDER BY slot

-- name: prop_items_stream
SELECT clinic_id, id, value, writes FROM hcrepo_prop.items WHERE batch = :batch ORDER BY slot

-- name: prop_set_value
UPDATE hcrepo_prop.items SET value = :value, writes = writes + 1 WHERE id = :id

-- name: prop_session
SELECT current_setting('app.clinic_id', true) AS clinic,
       current_setting('app.actor_id', true) AS actor

-- name: prop_fail_first
-- kind: write
-- The first `times` calls with a token fail with SQLSTATE 40001 (see hcrepo_prop.fail_first);
-- it writes (nextval), hence the kind.
SELECT hcrepo_prop.fail_first(:token, :times)
