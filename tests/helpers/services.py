"""Real services for tests, started on 127.0.0.1 and stopped afterwards: PostgreSQL, `mlflow server`, `prefect server
start`, and any command as a service in its own process group."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from flows.environment import QUIET_DEFAULTS


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop a service: SIGTERM (to its whole process group when it leads one, as `start` makes it), SIGKILL after
    `grace` seconds, and then whatever it left behind in its group."""
    group = os.getpgid(process.pid) == process.pid if process.poll() is None else False
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM) if group else process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
            process.wait(10)
    if group:
        try:  # children left behind in the group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def service_env(**extra: str) -> dict[str, str]:
    """This environment, quiet, with the venv's scripts first on PATH (`mlflow models serve` runs `uvicorn`)."""
    env = {**os.environ, **QUIET_DEFAULTS, "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll `url` until it answers 200; fail with the service's log if it exits or takes longer than `timeout`."""
    try:
        wait_http(url, timeout, process)
    except (RuntimeError, TimeoutError) as err:
        raise type(err)(f"{err}:\n{tail(log)}") from None


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path, *options: str, **env: str) -> Iterator[tuple[str, int]]:
    """The real `mlflow models serve` of `model_uri` (this environment's packages, `options` added) on a free loopback
    port, `env` in its environment; yields its base URL and the id of its process group (it leads one)."""
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", *options]
    store = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    server = start([*command, "-h", "127.0.0.1", "-p", str(port)], service_env(**store, **env), log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        stop(server)


def tail(log: Path, chars: int = 4000) -> str:
    """The end of a log file, for failure messages."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def postgres_bin() -> Path | None:
    """Folder of PostgreSQL's server programs (Debian's layout), or None when it is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the `postgres` user when we are root (the server refuses to run as root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, check=True, capture_output=True, text=True, **kwargs)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port with a database `mlflow`; yields its SQLAlchemy URI."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="rnnlm-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    try:
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
        options = f"-h 127.0.0.1 -p {port} -k {folder}"
        _as_postgres(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]
        )
        _as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"])
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
            + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A real `mlflow server` with proxied artifacts on a free loopback port; yields its URL."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=180, proc=proc)
        yield url
    finally:
        stop(proc)
        log.close()


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server start` (API + UI) on a free loopback port, with its own PREFECT_HOME under `home`;
    yields the environment (PREFECT_API_URL, PREFECT_HOME, ...) that clients, workers and flows need to use it."""
    port, log = free_port(), home / "server.log"
    env = {k: v for k, v in service_env(PREFECT_HOME=str(home / "home")).items() if not k.startswith("PREFECT_API")}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start(command, env, log)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_up(api + "/health", server, log, timeout=300)
        yield env | {"PREFECT_API_URL": api}
    finally:
        stop(server)
