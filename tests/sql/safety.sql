-- Test-only queries of tests/test_safety.py: writes hidden from the classifier, streams
-- that fail midway or run too long. tests/test_safety.py creates the table and function.

-- name: sneaky_insert
-- A SELECT, so a read by its parse tree; the VOLATILE function inserts.
SELECT safety_insert(:mark)

-- name: count_marks
SELECT count(*) FROM safety_marks WHERE mark = :mark

-- name: add_mark
INSERT INTO safety_marks (mark) VALUES (:mark)

-- name: numbers
SELECT g FROM generate_series(1, :upto) AS g

-- name: failing_stream
-- Fails in the second chunk a stream fetches (chunks are 2000 rows).
SELECT CASE WHEN g < 3000 THEN g ELSE g / (g - g) END FROM generate_series(1, 5000) AS g

-- name: slow_stream
-- timeout: 100ms
SELECT g FROM generate_series(1, 3) AS g, LATERAL (SELECT pg_sleep(0.4)) AS nap
