"""The MLflow store: where it is, a client on it, experiments, the writes SQLite cannot take at once, metric batches.

The active MLflow run is thread-local and Prefect may run tasks in other threads, so nothing here relies on it: the
flow creates the run, passes its id, and every call names the run through `MlflowClient`.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from filelock import FileLock
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rnnlm import paths

FINAL = "final_"  # the prefix of a run's final metrics (FitResult.metrics()), apart from the per-epoch ones


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI."""


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else SQLite under `<home>/mlruns/`, whatever the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlruns() / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store (`<store folder>/artifacts/<experiment>`); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment).as_uri()


def client() -> MlflowClient:
    """A client on the configured store (never the global default of the working directory)."""
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def check_reachable(uri: str) -> None:
    """Raise TrackingError in seconds when `uri` is a tracking server that does not answer its health check."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); start it "
            "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to use the local store"
        ) from err


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created (with its artifacts beside a SQLite store) if it does not exist."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(tracking_uri(), name))
    except MlflowException:  # another process created it in between
        if (experiment := mlflow_client.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id


@contextmanager
def sqlite_writer_lock(uri: str, purpose: str) -> Iterator[None]:
    """For a SQLite store, one process at a time (across processes, waiting) for writes that SQLite cannot take
    concurrently: creating the database, registering a model version. A no-op for servers, which serialise."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    folder = Path(uri.removeprefix("sqlite:///")).parent
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / f".rnnlm-{purpose}.lock"):  # released when the block ends, or when the process dies
        yield


_GLOBAL_STORE_LOCK = threading.Lock()


@contextmanager
def global_store(uri: str) -> Iterator[None]:
    """Point mlflow's process-wide tracking and registry URIs at `uri` for a block (log_model works on the active
    run, which lives in those globals), then put back what was there, so nothing leaks into later work."""
    with _GLOBAL_STORE_LOCK:  # sweep members register from threads of one process
        previous = (os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
            if previous[1] is None:  # set_registry_uri exports the variable but never removes it
                os.environ.pop("MLFLOW_REGISTRY_URI", None)


def run_link(run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's own, or README's `mlflow ui` on the local store."""
    uri = tracking_uri()
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{client().get_run(run_id).info.experiment_id}/runs/{run_id}"


def git_commit() -> str | None:
    """The project's current commit, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.home(), capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_final(mlflow_client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """A run's final metrics (a FitResult's `metrics()`) in one batch, under the FINAL prefix."""
    final = [mlflow.entities.Metric(f"{FINAL}{k}", float(v), 0, 0) for k, v in metrics.items()]
    mlflow_client.log_batch(run_id, metrics=final)


def as_param(key: str, value) -> mlflow.entities.Param:
    """A run param; None is written as 'None', as MLflow shows missing values."""
    return mlflow.entities.Param(key, "None" if value is None else str(value))


def run_tags() -> dict[str, str]:
    """Tags that tie an MLflow run to the Prefect flow run that made it."""
    from prefect.context import get_run_context

    context = get_run_context()
    flow_run = getattr(context, "flow_run", None) or getattr(getattr(context, "task_run", None), "flow_run_id", None)
    tags = {"mlflow.source.name": "flows/train_flow.py"}
    if flow_run is not None:
        tags["prefect.flow_run_id"] = str(getattr(flow_run, "id", flow_run))
    return tags


class MetricLogger:
    """Buffers per-epoch metrics and writes them in one `log_batch` per flush (one SQLite write, not hundreds).

    Steps up to `after_step` are already in the run (a resumed run) and are skipped, so no epoch is logged twice.
    """

    def __init__(self, run_id: str, after_step: int = 0):
        self.run_id, self.pending, self.client, self.after_step = run_id, [], client(), after_step

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        if step > self.after_step:
            self.pending += [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []
