"""Multi-job pipelines: reproducing the tutorial, the method benchmark, the speed benchmarks."""
