"""Multi-job pipelines: reproducing the tutorial, the method benchmark."""
