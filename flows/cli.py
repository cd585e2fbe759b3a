"""What every flow's command line shares: quiet defaults for Prefect and MLflow, and parsing with clear errors."""

import os
import sys

from pydantic import ValidationError
from pydantic_settings import CliApp

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "1",  # no usage telemetry from Prefect ...
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # ... or MLflow
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server needs > 20 s on 2 cores
}


def parse_command(command_cls, argv: list[str] | None = None):
    """Set the quiet defaults (the user's environment wins) and parse `argv` (default: sys.argv) into
    `command_cls`; a bad value exits with status 1 and a line naming each wrong option."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        return CliApp.run(command_cls, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        sys.exit(f"error: {problems} (see --help)")
