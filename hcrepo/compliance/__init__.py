"""HIPAA records: the PHI access log, and the machinery built on the PHI declarations of
`hcrepo.phi`."""
