"""What the tasks lean on, apart from the library: the MLflow store, which run a training trains in, registry
records, progress reports, and when a failed task is worth retrying."""
