-- Result shapes and call contracts (tests/test_results.py, tests/test_repository.py).

-- name: numbers
SELECT g AS n, 'row ' || g AS label
FROM generate_series(1, :n) AS g
ORDER BY g

-- name: numbers_page
-- order_by: sort = n, label
-- max_page: 50
SELECT g AS n, 'row ' || g AS label
FROM generate_series(1, :n) AS g
ORDER BY :sort
LIMIT :limit

-- name: numbers_default_cap
SELECT g AS n, 'row ' || g AS label
FROM generate_series(1, :n) AS g
LIMIT :limit

-- name: numbers_in
SELECT g AS n, 'row ' || g AS label
FROM generate_series(1, 10) AS g
WHERE g = ANY(:wanted) AND (:above::int IS NULL OR g > :above)
ORDER BY g

-- name: count_numbers
SELECT count(*) FROM generate_series(1, :n)

-- name: a_uuid
SELECT :id::uuid

-- name: a_text
SELECT 'hello ' || :name

-- name: a_timestamp
SELECT :at::timestamptz + interval '1 day'

-- name: a_null
SELECT NULL::int

-- name: two_columns
SELECT 1 AS a, 2 AS b

-- name: labels_as_text
SELECT g::text AS n, 'row ' || g AS label
FROM generate_series(1, :n) AS g
ORDER BY g

-- name: fill_scratch
INSERT INTO hcrepo_scratch SELECT generate_series(1, :n)

-- name: bump_scratch
UPDATE hcrepo_scratch SET n = n + 100 WHERE n <= :upto

-- name: take_scratch
DELETE FROM hcrepo_scratch WHERE n = :n RETURNING n

-- name: scratch_rows
SELECT n FROM hcrepo_scratch ORDER BY n

-- name: notify
-- kind: write
SELECT pg_notify('hcrepo_test', :message)

-- name: stat_probe
SELECT :marker::text AS marker
