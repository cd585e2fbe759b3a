"""What every flow's command line shares: quiet defaults for Prefect and MLflow, parsing with clear errors, and a
quick start and exit for `python flows/<flow>.py`."""

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp

from flows.environment import set_quiet_defaults
from rnnlm.config import RecipeError, read_recipe

# The errors that mean the user's input or setup was wrong: their message says what to do, and a command ends with
# it as one line instead of a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    "rnnlm.corpus.CorpusError",
    "rnnlm.corpus.DownloadError",
    "rnnlm.batches.DataError",
    "rnnlm.checkpoint.CheckpointMismatch",
    "rnnlm.cpu.checks.EngineSettingError",
    "rnnlm.generate.GenerationError",
    "rnnlm.train.TrainingDiverged",
    "tasks.store.TrackingError",
)

# Options after which the command never talks to a temporary Prefect server.
_NO_TEMPORARY_SERVER = {"-h", "--help", "--serve"}


def parse_command(command_cls, argv: list[str] | None = None):
    """Set the quiet defaults (the user's environment wins) and parse `argv` (default: sys.argv) into
    `command_cls`; a bad value exits with status 1 and a line naming each wrong option. A command with a
    `config_file` option takes its values from that recipe first: the command line's options override them (and
    they override RNNLM_* variables)."""
    set_quiet_defaults()
    argv = sys.argv[1:] if argv is None else argv
    try:
        recipe = read_recipe(path) if "config_file" in command_cls.model_fields and (path := _option(argv)) else {}
        return CliApp.run(command_cls, cli_args=argv, **recipe)
    except RecipeError as err:
        sys.exit(f"error: --config_file: {err}")
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        sys.exit(f"error: {problems} (see --help)")


def _problem(error: dict) -> str:
    """One validation error as the user reads it: the option and what is wrong (the message alone where it is about
    options together, a model check, and names them itself)."""
    loc = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"--{loc}: {message}" if loc else message


def _option(argv: Sequence[str], name: str = "--config_file") -> str | None:
    """The last value given to `name` in `argv` (as `name value` or `name=value`), if any."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is one of USER_ERRORS (by class path, so that this module imports none of them)."""
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(err).__mro__)


def run_command(run: Callable[[], object]):
    """Run a command's work: a user's mistake (USER_ERRORS) ends it with `error: <what to do>` and status 1, Ctrl-C
    with status 130; on the console Prefect logs such failures without their tracebacks (the Prefect UI keeps them)."""
    _quiet_tracebacks_of_user_errors()
    try:
        return run()
    except KeyboardInterrupt as err:
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if is_user_error(err):
            sys.exit(f"error: {err}")
        raise


class _NoUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_tracebacks_of_user_errors() -> None:
    """Drop the tracebacks of USER_ERRORS from the console handlers of Prefect's loggers."""
    from prefect.logging.handlers import APILogHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler) and not any(
                isinstance(f, _NoUserErrorTracebacks) for f in handler.filters
            ):
                handler.addFilter(_NoUserErrorTracebacks())


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

    def start() -> None:  # a failure (or the server stopped at exit while it boots) is the flow's to raise, not here
        with contextlib.suppress(Exception):
            server.start()

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
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


def exit_quickly(status: int | str | None = 0) -> None:
    """End a finished command now: flush, then do what the interpreter does first at exit (join the non-daemon
    threads and run their exit hooks, which close Prefect's connections; then the atexit handlers, where Prefect
    stops its temporary server), then leave without the module teardown that follows, which takes 1-2.5 s with
    torch, MLflow and Prefect loaded and does nothing a finished run needs. `status` as `sys.exit` takes it: a
    message is printed last, after the server's goodbye, and exits with status 1. Only for a script's last line."""
    sys.stdout.flush()
    sys.stderr.flush()
    threading._shutdown()  # as Py_FinalizeEx does before the atexit handlers
    atexit._run_exitfuncs()
    if isinstance(status, str):
        print(status, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(status, str) else status or 0)


def run_script(main: Callable[[], object]) -> None:
    """A script's whole life: `main()`, then a quick exit whose last line is the error, if `main` ended in one."""
    try:
        main()
    except SystemExit as stop:
        exit_quickly(stop.code)
    exit_quickly()
