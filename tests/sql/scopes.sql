-- Test-only queries of tests/test_scopes.py, in the routing tests' database (superuser,
-- no row-level security): which server answered, and writes the classifier cannot see.

-- name: find_note
SELECT inet_server_port() AS port, (SELECT note FROM routing_items WHERE id = :id) AS note

-- name: add_note
INSERT INTO routing_items (note) VALUES (:note) RETURNING id

-- name: add_note_by_function
-- A SELECT, so a read by its parse tree; the function inserts.
SELECT scopes_add_note(:note)
