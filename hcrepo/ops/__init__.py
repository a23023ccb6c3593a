"""Operating primitives every layer may use: Prometheus metrics, lock-free counters, circuit
breakers. Imports nothing of hcrepo but errors and config."""
