"""Operating primitives every layer may use: Prometheus metrics, lock-free counters, circuit
breakers, the bridge of psycopg's log records into loguru. They import nothing of hcrepo."""
