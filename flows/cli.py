"""What every flow's command line shares: quiet defaults for Prefect and MLflow, parsing with clear errors, and a
quick start and exit for `python flows/<flow>.py`."""

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliApp, EnvSettingsSource, SettingsError

from flows.environment import environment_value, set_quiet_defaults
from rnnlm.config import RENAMED, RecipeError, read_recipe

# The errors that mean the user's input or setup was wrong: their message says what to do, and a command ends with
# it as one line instead of a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    "rnnlm.corpus.CorpusError",
    "rnnlm.batches.DataError",
    "rnnlm.checkpoint.CheckpointMismatch",
    "rnnlm.download.DownloadError",
    "rnnlm.cpu.checks.EngineSettingError",
    "rnnlm.generate.GenerationError",
    "rnnlm.train.TrainingDiverged",
    "tracking.store.TrackingError",
)

# Errors that only say the user stopped the work (Ctrl-C reaching a trial on another thread): logged in one line.
STOPS = ("tracking.study.SearchStopped",)

# Options after which the command never talks to a temporary Prefect server.
_NO_TEMPORARY_SERVER = {"-h", "--help", "--serve"}


class CommandSettings(BaseSettings):
    """A command's settings: from the command line, a recipe and the environment, where a list field takes the
    command line's syntax too (`RNNLM_ADAPTIVE_CUTOFFS=2000,6000` as well as `[2000, 6000]`)."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # the order pydantic-settings gives them, the environment read by _EnvSource
        return init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings


class _EnvSource(EnvSettingsSource):
    """Environment variables as pydantic-settings reads them, but a list may also be written as on the command line:
    comma-separated values."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value):
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            if isinstance(value, str) and getattr(field.annotation, "__origin__", None) is list:
                return [part.strip() for part in value.split(",") if part.strip()]
            raise


def parse_command(command_cls, argv: list[str] | None = None, engine: bool = False):
    """Set the quiet defaults (the user's environment wins) and parse `argv` (default: sys.argv) into
    `command_cls`; a bad value exits with status 1 and a line naming each wrong option (the RNNLM_* variable where
    the value came from the environment). A command with a `config_file` option (or its variable, e.g.
    RNNLM_CONFIG_FILE) takes its values from that recipe first: the command line's options override them (and
    they override RNNLM_* variables). Options under their former names (rnnlm.config.RENAMED) are taken, with one
    note saying so. With `engine` (commands that train), the CPU engine's own variables are checked too."""
    set_quiet_defaults()
    argv = sys.argv[1:] if argv is None else argv
    prefix = command_cls.model_config.get("env_prefix", "")
    recipe_option = "--config_file" if _option(argv) else f"{prefix.upper()}CONFIG_FILE"
    recipe = {}
    try:
        if "config_file" in command_cls.model_fields and (path := _recipe(argv, prefix)):
            recipe = read_recipe(path)
        argv, recipe = _former_names(command_cls, argv, recipe)
        command = CliApp.run(command_cls, cli_args=argv, **recipe)
        if engine:  # a command that trains: the CPU engine's own variables too
            _check_engine_settings()
        return command
    except RecipeError as err:
        sys.exit(f"error: {recipe_option}: {err}")
    except ValidationError as err:
        problems = "; ".join(dict.fromkeys(_problem(e, argv, prefix, recipe) for e in err.errors()))
        sys.exit(f"error: {problems} (see --help)")
    except SettingsError as err:  # a variable that cannot be read as its field's type, e.g. a list
        cause = f": {err.__cause__}" if err.__cause__ else ""
        sys.exit(f"error: {err}{cause} (see docs/usage.md, 'Settings in the environment')")


def _check_engine_settings() -> None:
    """The CPU engine's own variables (RNNLM_NATIVE, RNNLM_CPU_CHOICE) checked with the options, so that a value it
    does not take ends the command in one line before anything starts, not when training reaches the engine."""
    from rnnlm.cpu import check_environment  # torch: imported only once the options are good
    from rnnlm.cpu.checks import EngineSettingError

    try:
        check_environment()
    except EngineSettingError as err:
        sys.exit(f"error: {err}")


def _recipe(argv: Sequence[str], prefix: str) -> str | None:
    """The recipe named on the command line, else by the environment (RNNLM_CONFIG_FILE)."""
    return _option(argv) or environment_value(prefix + "config_file")


def _former_names(command_cls, argv: Sequence[str], recipe: dict) -> tuple[list[str], dict]:
    """`argv` and `recipe` with options under their former names (RENAMED) given their new ones, and a variable under
    a former name (RNNLM_REGISTER) taken when the new one is not set; prints one note when a former name was used."""
    used, recipe = set(), dict(recipe)
    args = [_new_name(arg, used) for arg in argv]
    prefix = command_cls.model_config.get("env_prefix", "")
    for old, new in RENAMED.items():
        if new not in command_cls.model_fields:
            continue
        if old in recipe:
            used.add(old)
            if new not in recipe:
                recipe[new] = recipe.pop(old)
        elif (value := environment_value(prefix + old)) is not None:
            used.add(old)
            if new not in recipe and environment_value(prefix + new) is None:
                recipe[new] = value
    if used:
        renamed = ", ".join(f"{old} is now {RENAMED[old]}" for old in sorted(used))
        print(f"note: options renamed ({renamed}); the former names still work", file=sys.stderr)
    return args, recipe


def _new_name(arg: str, used: set[str]) -> str:
    """`arg` with an option's former name (`--register`, `--base.register=last`) replaced, adding it to `used`."""
    found = re.fullmatch(r"--((?:\w+\.)*)(\w+)(=.*)?", arg, re.DOTALL)
    if not found or found[2] not in RENAMED:
        return arg
    used.add(found[2])
    return f"--{found[1]}{RENAMED[found[2]]}{found[3] or ''}"


def _problem(error: dict, argv: Sequence[str] = (), prefix: str = "", recipe: dict | None = None) -> str:
    """One validation error as the user reads it: the option (or the RNNLM_* variable, where the value came from the
    environment) and what is wrong; the message alone where it is about options together (a model check, which
    names them itself)."""
    loc = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    name = str(error["loc"][0])
    given = name in (recipe or {}) or any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)
    if not given and prefix and environment_value(prefix + name) is not None:
        item = f" (item {'.'.join(map(str, error['loc'][1:]))})" if len(error["loc"]) > 1 else ""
        return f"{prefix.upper()}{name.upper()}{item}: {message}"
    return f"--{loc}: {message}"


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
    """Whether `err` is one of USER_ERRORS."""
    return _is_one_of(err, USER_ERRORS)


def _is_one_of(err: BaseException, kinds: tuple[str, ...]) -> bool:
    """Whether `err` is of one of `kinds`, by class path, so that this module imports none of them."""
    return any(f"{c.__module__}.{c.__qualname__}" in kinds for c in type(err).__mro__)


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
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and _is_one_of(err, USER_ERRORS + STOPS):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_tracebacks_of_user_errors() -> None:
    """Drop the tracebacks of USER_ERRORS and STOPS from the console handlers of Prefect's loggers."""
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
