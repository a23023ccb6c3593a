-- Test-only queries for the routing, failover and pool tests (tests/routing_fixtures.py
-- creates the table in its own database). inet_server_port() tells which server answered.

-- name: where_am_i
SELECT inet_server_port()

-- name: find_note
SELECT inet_server_port() AS port, (SELECT note FROM routing_items WHERE id = :id) AS note

-- name: add_note
INSERT INTO routing_items (note) VALUES (:note) RETURNING id

-- name: add_bulk
INSERT INTO routing_items (note) SELECT md5(g::text) FROM generate_series(1, :count) AS g

-- name: slow_where_am_i
SELECT inet_server_port() FROM (SELECT pg_sleep(:seconds)) AS nap, routing_items LIMIT 1
