"""Benchmarks: hcrepo against raw psycopg, SQLAlchemy Core and aiosql, as ratios in one run."""
