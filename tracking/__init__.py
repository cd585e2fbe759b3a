"""What the tasks lean on: the MLflow store, which run a training trains in, registry records, progress reports."""
