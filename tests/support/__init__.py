"""Helpers the tests share: small repositories over tests/sql, clinics made for one test,
the routing and cache test harnesses, and a wire relay that counts round trips."""
