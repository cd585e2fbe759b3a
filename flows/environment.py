"""The environment every command sets before Prefect or MLflow is imported: no telemetry from either, and time enough
for Prefect's temporary server to start on a small machine. The user's own settings win."""

import os

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "1",  # no usage telemetry from Prefect ...
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # ... or MLflow
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server needs > 20 s on 2 cores
}


def set_quiet_defaults() -> None:
    """Turn off telemetry and lengthen the temporary server's start-up timeout, unless the environment says else."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


def environment_value(name: str) -> str | None:
    """The value of the environment variable `name`, its case ignored (as pydantic-settings reads them)."""
    name = name.lower()
    return next((value for key, value in os.environ.items() if key.lower() == name), None)
