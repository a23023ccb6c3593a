"""HIPAA safeguards: what a model declares about its fields (PHI, encrypted), and the
machinery built on those declarations."""
