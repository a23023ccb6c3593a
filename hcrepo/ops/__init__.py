"""Operating primitives every layer may use: Prometheus metrics, lock-free counters, circuit
breakers. They import nothing of hcrepo."""
