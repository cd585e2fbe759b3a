"""MLflow: where the store is, one run per flow run, its params, artifacts, the pyfunc model and its registration.

The active MLflow run is thread-local and Prefect may run tasks in other threads, so nothing here relies on it: the
flow creates the run, passes its id, and every call names the run through `MlflowClient`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rnnlm.config import TrainConfig
from rnnlm.experiment import PROJECT_ROOT, PreparedData, environment
from rnnlm.generate import MAX_PREDS

DEFAULT_STORE = PROJECT_ROOT / "mlruns"
MODEL_SCRIPT = Path(__file__).with_name("pyfunc_model.py")
PYFUNC_PARAMS = {"num_preds": 50, "temperature": 1.0, "top_k": 1, "seed": 0}


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI."""


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else SQLite under `<project>/mlruns/`, whatever the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store (`<store folder>/artifacts/<experiment>`); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment).as_uri()


def client() -> MlflowClient:
    """A client on the configured store (never the global default of the working directory)."""
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


@task(name="check-tracking", task_run_name="check-tracking", cache_policy=NO_CACHE)
def check_tracking(config: TrainConfig) -> str:
    """Fail in seconds, before any download or training, when the tracking store cannot be reached."""
    uri = tracking_uri()
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to use the local store"
            ) from err
    elif scheme == "sqlite":
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    _experiment_id(config.experiment)
    get_run_logger().info("MLflow tracking at %s, experiment %r", uri, config.experiment)
    return uri


def _experiment_id(name: str) -> str:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(tracking_uri(), name))


def run_link(run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's own, or README's `mlflow ui` on the local store."""
    uri = tracking_uri()
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{client().get_run(run_id).info.experiment_id}/runs/{run_id}"


def git_commit() -> str | None:
    """The project's current commit, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@task(name="start-mlflow-run", task_run_name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(config: TrainConfig, data: PreparedData, parent_run_id: str | None = None) -> str:
    """Create the run (nested under `parent_run_id` when given) and log every config value, the data's identity
    and the software versions as params."""
    mlflow_client = client()
    tags = _run_tags() | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = mlflow_client.create_run(_experiment_id(config.experiment), tags=tags)
    params = {**config.model_dump(mode="json"), **environment()}
    params |= {"corpus_file_sha1": data.corpus_sha1, "vocab_size": data.vocab_size, "git_commit": git_commit()}
    params |= {"train_tokens": data.train_tokens, "val_tokens_actual": data.val_tokens}
    mlflow_client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    get_run_logger().info("MLflow run %s started", run.info.run_id)
    return run.info.run_id


def _param(key: str, value) -> mlflow.entities.Param:
    return mlflow.entities.Param(key, "None" if value is None else str(value))


def _run_tags() -> dict[str, str]:
    from prefect.context import get_run_context

    context = get_run_context()
    flow_run = getattr(context, "flow_run", None) or getattr(getattr(context, "task_run", None), "flow_run_id", None)
    tags = {"mlflow.source.name": "flows/train_flow.py"}
    if flow_run is not None:
        tags["prefect.flow_run_id"] = str(getattr(flow_run, "id", flow_run))
    return tags


class MetricLogger:
    """Buffers per-epoch metrics and writes them in one `log_batch` per flush (one SQLite write, not hundreds)."""

    def __init__(self, run_id: str):
        self.run_id, self.pending, self.client = run_id, [], client()

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        self.pending += [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []


@contextmanager
def run_guard(run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block succeeds; FAILED (or KILLED on Ctrl-C) with the reason as a tag if not."""
    mlflow_client = client()
    try:
        yield
    except BaseException as err:
        status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) else RunStatus.FAILED
        mlflow_client.set_tag(run_id, "failure_reason", f"{type(err).__name__}: {err}"[:5000])
        mlflow_client.set_terminated(run_id, RunStatus.to_string(status))
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")


@task(name="log-results", task_run_name="log-results", cache_policy=NO_CACHE)
def log_results(run_id: str, result: dict, samples: dict, plot_path: str, vocab_path: str) -> None:
    """Final metrics, samples, the perplexity curve, the vocab and the checkpoint as run artifacts."""
    mlflow_client = client()
    final = {f"final_{k}": v for k, v in result.items() if k in _FINAL and v is not None}
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in final.items()])
    mlflow_client.set_tag(run_id, "device", result["device"])
    with tempfile.TemporaryDirectory() as tmp:
        samples_path = Path(tmp) / "samples.json"
        samples_path.write_text(json.dumps(samples, indent=1))
        mlflow_client.log_artifact(run_id, str(samples_path))
    mlflow_client.log_artifact(run_id, plot_path)
    mlflow_client.log_artifact(run_id, vocab_path)
    mlflow_client.log_artifact(run_id, result["checkpoint"], artifact_path="checkpoint")


_FINAL = ("train_perplexity", "val_perplexity", "best_val_perplexity", "tokens_per_sec", "train_seconds")


_GLOBAL_STORE_LOCK = threading.Lock()


@contextmanager
def _global_store(uri: str) -> Iterator[None]:
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


@task(name="register-model", task_run_name="register-model", cache_policy=NO_CACHE)
def register_model(config: TrainConfig, run_id: str, checkpoint: str, result: dict) -> int:
    """Log the checkpoint as a generating pyfunc model and register it as a new version; return the version.

    This is the run's last step, so that a failure anywhere earlier leaves no version behind.
    """
    import torch

    with _global_store(tracking_uri()), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_SCRIPT),
            artifacts={"checkpoint": checkpoint},
            code_paths=[str(PROJECT_ROOT / "rnnlm")],
            input_example=(["time traveller"], PYFUNC_PARAMS),
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
            registered_model_name=config.registered_model,
            metadata={"max_num_preds": MAX_PREDS, "tokenization": config.tokenization},
        )
    version = int(info.registered_model_version)
    tags = {"val_perplexity": result.get("val_perplexity"), "train_perplexity": result["train_perplexity"]}
    tags |= {"rnn": config.rnn, "tokenization": config.tokenization, "run_id": run_id}
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(config.registered_model, str(version), key, str(value))
    get_run_logger().info("registered %s version %d", config.registered_model, version)
    return version
