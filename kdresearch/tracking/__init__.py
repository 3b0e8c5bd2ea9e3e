"""Everything the project says to MLflow: the store, a run (with its outage queue), lineage."""
