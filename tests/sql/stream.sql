-- Many rows from nowhere, for the streaming memory test (tests/test_stream_memory.py).

-- name: generated_rows
SELECT g AS n, md5(g::text) || md5((g + 1)::text) AS payload
FROM generate_series(1, :count) AS g
