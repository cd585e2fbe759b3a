"""The served model: the MLflow pyfunc that generates text, its batcher, and its changes to MLflow's scoring server."""
