"""pytest plugins loaded by tests/conftest.py (real servers, shared fixtures)."""
