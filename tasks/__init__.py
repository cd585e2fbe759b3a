"""Prefect tasks: thin wrappers that call `rnnlm`, log, and return paths or small dicts."""
