"""Start real services as subprocesses on 127.0.0.1, wait for them, and stop them (their whole process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from services import free_port, wait_http  # noqa: F401 (free_port is used by the tests)

QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PYTHONUNBUFFERED": "1",
}


def service_env(**extra: str) -> dict[str, str]:
    """This environment, quiet, with the venv's scripts first on PATH (`mlflow models serve` runs `uvicorn`)."""
    env = {**os.environ, **QUIET, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop the process and everything it started (SIGTERM to its group, SIGKILL after `grace` seconds)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    try:  # children left behind in the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll `url` until it answers 200; fail with the service's log if it exits or takes longer than `timeout`."""
    try:
        wait_http(url, timeout, process)
    except (RuntimeError, TimeoutError) as err:
        raise type(err)(f"{err}:\n{tail(log)}") from None


def tail(log: Path, chars: int = 4000) -> str:
    """The end of a log file, for failure messages."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"
