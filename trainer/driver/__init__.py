"""The driver: config schemas and validation, building and running a run from a config,
the run dir's record, loading a finished run."""
