"""Groups of runs: a sweep's parent run, and the resumable Optuna search."""
