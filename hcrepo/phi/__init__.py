"""What protected health information is and how it is kept out of sight: the field markers
(`PHI`, `Encrypted`, `PatientId`), the names that denote PHI, and masking of models, text,
exceptions and log records. Everything that logs in hcrepo logs through `phi.logs.logger`."""
