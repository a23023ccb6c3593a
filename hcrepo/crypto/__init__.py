"""Field encryption: AES-256-GCM envelopes bound to clinic, table, column and row
(`envelope`), the master keys and where they come from (`keys`), the per-clinic data keys
(`keyring`) and the keyed blind indexes that make exact-match search possible
(`blind_index`). Nothing here talks to PostgreSQL; `hcrepo.key_store` does."""
