"""MLflow: where the store is, one run per flow run, its params, artifacts, the pyfunc model and its registration.

The active MLflow run is thread-local and Prefect may run tasks in other threads, so nothing here relies on it: the
flow creates the run, passes its id, and every call names the run through `MlflowClient`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
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
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rnnlm import experiment
from rnnlm.checkpoint import try_lock, unlock, unlock_in
from rnnlm.config import TrainConfig
from rnnlm.experiment import PROJECT_ROOT, PreparedData, environment
from rnnlm.generate import MAX_PREDS
from rnnlm.vocab import Vocab

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
    with sqlite_writer_lock(uri, "init"):  # several processes creating one SQLite store would race its migration
        experiment_id(config.experiment)
    get_run_logger().info("MLflow tracking at %s, experiment %r", uri, config.experiment)
    return uri


def experiment_id(name: str) -> str:
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
    with open(folder / f".rnnlm-{purpose}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


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


RESUMED_FROM_TAG = "rnnlm.resumed_from_run"


@task(name="start-mlflow-run", task_run_name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(config: TrainConfig, data: PreparedData, parent_run_id: str | None = None) -> str:
    """The run to train in: the interrupted run of this same training when one left a checkpoint (same run id,
    metrics continue), else a new run (nested under `parent_run_id` when given) with every config value, the
    data's identity and the software versions as params.

    The returned run's checkpoint is locked by this process until `run_guard` ends, so two processes never train
    into the same run.
    """
    mlflow_client = client()
    if config.resume == "auto" and (run_id := _resumable_run(mlflow_client, config, data, parent_run_id)):
        return run_id
    run_id = _new_run(mlflow_client, config, data, parent_run_id)
    try_lock(_lock_of(experiment.run_checkpoint(config, data.corpus_sha1, run_id)))
    get_run_logger().info("MLflow run %s started", run_id)
    return run_id


def _new_run(mlflow_client: MlflowClient, config: TrainConfig, data: PreparedData, parent_run_id: str | None) -> str:
    tags = run_tags() | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = mlflow_client.create_run(experiment_id(config.experiment), tags=tags)
    params = {**config.model_dump(mode="json"), **environment()}
    params |= {"corpus_file_sha1": data.corpus_sha1, "vocab_size": data.vocab_size, "git_commit": git_commit()}
    params |= {"train_tokens": data.train_tokens, "val_tokens_actual": data.val_tokens}
    mlflow_client.log_batch(run.info.run_id, params=[as_param(k, v) for k, v in params.items()])
    return run.info.run_id


def _lock_of(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".lock")


def _resumable_run(
    mlflow_client: MlflowClient, config: TrainConfig, data: PreparedData, parent_run_id: str | None
) -> str | None:
    """The newest checkpoint of this training whose process is gone and whose run did not finish, taken over."""
    folder = experiment.checkpoint_folder(config, data.corpus_sha1)
    found = folder.glob("*/model.pt") if folder.is_dir() else []
    candidates = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if not try_lock(_lock_of(path)):
            continue  # a live process is training that run right now
        status = _run_status(mlflow_client, path.parent.name)
        if status == "FINISHED":  # its model is in MLflow; the local copy is no longer needed
            unlock(_lock_of(path))
            shutil.rmtree(path.parent, ignore_errors=True)
            continue
        try:
            ckpt = experiment.read_resumable(path, config, Vocab.load(data.vocab_path), data.corpus_sha1)
            return _continue(mlflow_client, config, data, path, status, ckpt["epoch"], parent_run_id)
        except BaseException:
            unlock(_lock_of(path))  # a refused checkpoint stays for the user to see; nobody holds it
            raise
    return None


def _run_status(mlflow_client: MlflowClient, run_id: str) -> str | None:
    """The run's status, or None when this store has no such (undeleted) run."""
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return None
    return run.info.status if run.info.lifecycle_stage == "active" else None


def _continue(mlflow_client, config, data, path: Path, status: str | None, epoch: int, parent_run_id: str | None):
    """Reopen the checkpoint's run; if this store cannot continue it, start a new run that records the link."""
    logger, old_id = get_run_logger(), path.parent.name
    if status is not None:
        _reopen(mlflow_client, old_id, epoch)
        logger.warning("resuming MLflow run %s (%s) from its checkpoint at epoch %d: %s", old_id, status, epoch, path)
        return old_id
    new_id = _new_run(mlflow_client, config, data, parent_run_id)
    mlflow_client.set_tag(new_id, RESUMED_FROM_TAG, old_id)
    mlflow_client.set_tag(new_id, "rnnlm.resumed_at_epoch", str(epoch))
    new_path = path.parent.with_name(new_id) / path.name
    new_path.parent.mkdir()
    try_lock(_lock_of(new_path))
    os.replace(path, new_path)
    unlock(_lock_of(path))
    shutil.rmtree(path.parent, ignore_errors=True)
    logger.warning(
        "MLflow run %s of checkpoint %s cannot be continued in this store; continuing its training from epoch %d "
        "as run %s (tag %s)",
        old_id, path, epoch, new_id, RESUMED_FROM_TAG,
    )  # fmt: skip
    return new_id


def _reopen(mlflow_client: MlflowClient, run_id: str, epoch: int) -> None:
    """Set the run RUNNING again, tagged with this flow run; its last failure reason moves to
    `rnnlm.previous_failure`."""
    mlflow_client.update_run(run_id, status="RUNNING")
    for key, value in run_tags().items():
        mlflow_client.set_tag(run_id, key, value)
    if reason := mlflow_client.get_run(run_id).data.tags.get("failure_reason"):
        mlflow_client.set_tag(run_id, "rnnlm.previous_failure", reason)
        mlflow_client.delete_tag(run_id, "failure_reason")
    mlflow_client.set_tag(run_id, "rnnlm.resumed_at_epoch", str(epoch))


def last_logged_epoch(run_id: str) -> int:
    """The last epoch whose training perplexity the run holds (0 for none): a resumed run logs after it."""
    return max((m.step for m in client().get_metric_history(run_id, "train_perplexity")), default=0)


def as_param(key: str, value) -> mlflow.entities.Param:
    return mlflow.entities.Param(key, "None" if value is None else str(value))


def run_tags() -> dict[str, str]:
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


@contextmanager
def run_guard(run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block succeeds; FAILED (or KILLED on Ctrl-C) with the reason as a tag if not.
    Either way, release this process's claim on the run's checkpoint so that a later run can resume it."""
    mlflow_client = client()
    try:
        yield
    except BaseException as err:
        status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) else RunStatus.FAILED
        mlflow_client.set_tag(run_id, "failure_reason", f"{type(err).__name__}: {err}"[:5000])
        mlflow_client.set_terminated(run_id, RunStatus.to_string(status))
        raise
    else:
        mlflow_client.set_terminated(run_id, "FINISHED")
    finally:
        unlock_in(run_id)


@task(name="log-results", task_run_name="log-results", cache_policy=NO_CACHE)
def log_results(run_id: str, result: dict, samples: dict, plot_path: str, vocab_path: str) -> None:
    """Final metrics, samples, the perplexity curve, the vocab and the checkpoint as run artifacts."""
    mlflow_client = client()
    final = {f"final_{k}": v for k, v in result.items() if k in _FINAL and v is not None}
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in final.items()])
    mlflow_client.set_tag(run_id, "device", result["device"])
    mlflow_client.set_tag(run_id, "matmuls", result["matmuls"])
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

    uri = tracking_uri()
    with sqlite_writer_lock(uri, "registry"), _global_store(uri), mlflow.start_run(run_id=run_id):
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
