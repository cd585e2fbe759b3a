"""MLflow tasks: check the store, start (or take over) the run, log its results, register its model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import serving
from rnnlm import paths
from rnnlm.config import TrainConfig
from rnnlm.data import PreparedData
from rnnlm.generate import BUDGET_DEFAULTS, MAX_PREDS, SAMPLING_DEFAULTS
from rnnlm.run import FitResult
from tracking import store
from tracking.runs import TrackedRun, start_or_resume

MODEL_SCRIPT = Path(serving.__file__).with_name("model.py")  # MLflow runs it to load the model: never imported


@task(name="check-tracking", task_run_name="check-tracking", cache_policy=NO_CACHE)
def check_tracking(config: TrainConfig) -> str:
    """Fail in seconds, before any download or training, when the tracking store cannot be reached."""
    uri = store.tracking_uri()
    store.check_reachable(uri)
    with store.sqlite_writer_lock(uri, "init"):  # several processes creating one SQLite store would race its migration
        store.experiment_id(config.experiment)
    get_run_logger().info("MLflow tracking at %s, experiment %r", uri, config.experiment)
    return uri


@task(name="start-mlflow-run", task_run_name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(config: TrainConfig, data: PreparedData, parent_run_id: str | None = None) -> TrackedRun:
    """The run to train in, its checkpoint claimed by this process until `run_guard` ends: the interrupted run of
    this same training when one left a checkpoint, else a new run nested under `parent_run_id` when given."""
    tracked = start_or_resume(config, data, parent_run_id)
    logger = get_run_logger()
    (logger.warning if tracked.resumed_at_epoch else logger.info)(tracked.describe())
    return tracked


@task(name="log-results", task_run_name="log-results", cache_policy=NO_CACHE)
def log_results(run_id: str, result: FitResult, samples: dict, plot_path: str, vocab_path: str) -> None:
    """Final metrics, samples, the perplexity curve, the vocab and the checkpoint as run artifacts."""
    mlflow_client = store.client()
    store.log_final(mlflow_client, run_id, result.metrics())
    for key, value in result.tags().items():
        mlflow_client.set_tag(run_id, key, value)
    mlflow_client.log_text(run_id, json.dumps(samples, indent=1), "samples.json")
    mlflow_client.log_artifact(run_id, plot_path)
    mlflow_client.log_artifact(run_id, vocab_path)
    mlflow_client.log_artifact(run_id, result.checkpoint, artifact_path="checkpoint")
    if result.registered_checkpoint != result.checkpoint:
        mlflow_client.log_artifact(run_id, result.registered_checkpoint, artifact_path="checkpoint")


@task(name="register-model", task_run_name="register-model", cache_policy=NO_CACHE)
def register_model(config: TrainConfig, run_id: str, result: FitResult) -> int:
    """Log the registered weights (the best by validation, or the last: `config.register_weights`) as a generating
    pyfunc model and register it as a new version, tagged with those weights' own numbers; return the version.

    This is the run's last step, so that a failure anywhere earlier leaves no version behind.
    """
    import torch

    uri = store.tracking_uri()
    with store.sqlite_writer_lock(uri, "registry"), store.global_store(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_SCRIPT),
            artifacts={"checkpoint": result.registered_checkpoint or result.checkpoint},
            code_paths=[str(paths.PACKAGE), str(MODEL_SCRIPT.parent)],
            input_example=(["time traveller"], SAMPLING_DEFAULTS),
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
            registered_model_name=config.registered_model,
            metadata={"max_num_preds": MAX_PREDS, "tokenization": config.tokenization},
            model_config=BUDGET_DEFAULTS,  # what one served request may cost; RNNLM_SERVE_* overrides it when served
        )
    version = int(info.registered_model_version)
    tags = result.version_tags() | {"rnn": config.rnn, "tokenization": config.tokenization, "run_id": run_id}
    mlflow_client = store.client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(config.registered_model, str(version), key, str(value))
    get_run_logger().info("registered %s version %d", config.registered_model, version)
    return version
