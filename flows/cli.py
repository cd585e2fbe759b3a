"""What every flow's command line shares: quiet defaults for Prefect and MLflow, parsing with clear errors, and a
quick start and exit for `python flows/<flow>.py`."""

import atexit
import os
import sys
import threading
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "1",  # no usage telemetry from Prefect ...
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # ... or MLflow
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server needs > 20 s on 2 cores
}

# Options after which the command never talks to a temporary Prefect server.
_NO_TEMPORARY_SERVER = {"-h", "--help", "--serve"}


def set_quiet_defaults() -> None:
    """Turn off telemetry and lengthen the temporary server's start-up timeout, unless the environment says else."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


def parse_command(command_cls, argv: list[str] | None = None):
    """Set the quiet defaults (the user's environment wins) and parse `argv` (default: sys.argv) into
    `command_cls`; a bad value exits with status 1 and a line naming each wrong option."""
    set_quiet_defaults()
    try:
        return CliApp.run(command_cls, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        sys.exit(f"error: {problems} (see --help)")


def start_temporary_server(argv: Sequence[str] | None = None) -> Callable[[], None]:
    """Start Prefect's temporary server in the background now, so that it boots on another core while torch and
    MLflow import; returns a function that waits until it is up. Does nothing (and the returned function returns at
    once) when PREFECT_API_URL names a server, when temporary servers are off, or for --help and --serve.

    The server is Prefect's own `SubprocessASGIServer` singleton, the one the flow would start anyway: the flow
    finds it running, and Prefect stops it at exit as usual. A failed start is not raised here; the flow's own start
    then raises it."""
    set_quiet_defaults()
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    args = sys.argv[1:] if argv is None else argv
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or _NO_TEMPORARY_SERVER & set(args):
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    thread = threading.Thread(target=server.start, name="prefect-server-start", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if server.running:  # Prefect's own line about it was logged before its logging was set up: say it now
            from prefect.logging import get_logger

            get_logger("prefect").info(
                f"Started temporary server on {server.address} (see https://docs.prefect.io/v3/concepts/server "
                "for running a dedicated Prefect server)"
            )

    return wait


def exit_quickly(status: int = 0) -> None:
    """End a finished command now: flush, then do what the interpreter does first at exit (join the non-daemon
    threads and run their exit hooks, which close Prefect's connections; then the atexit handlers, where Prefect
    stops its temporary server), then leave without the module teardown that follows, which takes 1-2.5 s with
    torch, MLflow and Prefect loaded and does nothing a finished run needs. Only for a script's last line."""
    sys.stdout.flush()
    sys.stderr.flush()
    threading._shutdown()  # as Py_FinalizeEx does before the atexit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
