"""Prefect flows: they wire tasks and nothing else."""
