"""Administering a database for hcrepo: migrations with the roles and bootstrap they need
(migrate), checking every repository query against the live schema (check), and the plain
connections both use (connect). May import the core modules; the runtime never imports it.
"""
