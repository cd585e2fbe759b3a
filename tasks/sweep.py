"""Sweep tasks: the parent MLflow run, each member as its own training flow run, and the table of them beside the
book's printed results."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from rnnlm.config import TrainConfig
from rnnlm.run import FitResult
from tracking.store import FINAL, as_param, client, experiment_id, run_tags

# Training perplexities the book prints for its chapter 8-9 models (500 epochs, 10,000 tokens, batch 32, 35 steps).
BOOK_PERPLEXITY = {("rnn", 1): 1.3, ("gru", 1): 1.0, ("lstm", 1): 1.1, ("lstm", 2): 1.0}
BOOK_SECTION = {("rnn", 1): "8.6", ("gru", 1): "9.1", ("lstm", 1): "9.2", ("lstm", 2): "9.3"}


@task(name="start-sweep-run", task_run_name="start-sweep-run", cache_policy=NO_CACHE)
def start_sweep_run(members: list[TrainConfig], runner: str) -> str:
    """The parent MLflow run that every member's run is nested under."""
    mlflow_client = client()
    experiment = members[0].experiment
    run = mlflow_client.create_run(experiment_id(experiment), run_name="sweep", tags=run_tags())
    params = {"members": len(members), "task_runner": runner}
    params |= {f"member_{i}": _describe(c) for i, c in enumerate(members)}
    mlflow_client.log_batch(run.info.run_id, params=[as_param(k, v) for k, v in params.items()])
    get_run_logger().info("sweep of %d configurations, MLflow parent run %s", len(members), run.info.run_id)
    return run.info.run_id


@task(
    name="train-member",
    task_run_name="train-{config.rnn}-x{config.num_layers}-{config.max_tokens}",
    cache_policy=NO_CACHE,
)
def train_member(train: Callable[..., dict], config: TrainConfig, parent_run_id: str, deployment: str | None) -> dict:
    """One member as its own run of the training flow `train`, its MLflow run nested under the sweep's: here, or
    through `deployment` on a worker (whose results are then read back from MLflow, which every machine shares)."""
    if deployment is None:
        return train(config, parent_run_id=parent_run_id)
    parameters = {"config": config.model_dump(mode="json"), "parent_run_id": parent_run_id}
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"flow run {flow_run.name} of {deployment} ended {flow_run.state.name}")
    return member_summary(str(flow_run.id), config.registered_model)


def member_summary(flow_run_id: str, registered_model: str) -> dict:
    """What a member's train flow returned, read back from MLflow by its Prefect flow run id."""
    mlflow_client = client()
    [run] = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    [version] = mlflow_client.search_model_versions(f"name = '{registered_model}' and run_id = '{run.info.run_id}'")
    summary = FitResult.summary_from_logged(run.data.metrics, run.data.tags, prefix=FINAL)
    return {"run_id": run.info.run_id, "version": int(version.version), **summary}


def _describe(config: TrainConfig) -> str:
    tokens = "all" if config.max_tokens == -1 else f"{config.max_tokens}"
    return f"{config.rnn} x{config.num_layers} h{config.num_hiddens} lr{config.lr} tokens={tokens}"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def sweep_table(members: list[TrainConfig], results: list[dict | BaseException]) -> pd.DataFrame:
    """One row per member: its setting, the book's training perplexity where the book has one, ours, the last and the
    registered weights' validation perplexity, and more."""
    rows = []
    for config, result in zip(members, results, strict=True):
        key = (config.rnn, config.num_layers)
        full = config.max_tokens == -1
        failed = isinstance(result, BaseException)
        rows.append(
            {
                "model": f"{config.rnn.upper()}{' x' + str(config.num_layers) if config.num_layers > 1 else ''}",
                "d2l": BOOK_SECTION.get(key, ""),
                "lr": config.lr,
                "train_tokens": "all but val" if full else config.max_tokens,
                "epochs": config.num_epochs,
                "book_train_ppl": None if full else BOOK_PERPLEXITY.get(key),
                "train_ppl": None if failed else round(result["train_perplexity"], 3),
                "val_ppl": _rounded(None if failed else result["val_perplexity"]),
                "registered_val_ppl": _rounded(None if failed else result.get("registered_val_perplexity")),
                "tokens_per_s": None if failed else round(result["tokens_per_sec"]),
                "device": None if failed else result["device"],
                "run_id": None if failed else result["run_id"],
                "version": None if failed else result["version"],
                "error": f"{type(result).__name__}: {result}"[:200] if failed else "",
            }
        )
    return pd.DataFrame(rows)


@task(name="report-sweep", task_run_name="report-sweep", cache_policy=NO_CACHE)
def report_sweep(members: list[TrainConfig], results: list, parent_run_id: str) -> list[dict]:
    """Print the table, and keep it as a Prefect table artifact and as CSV + markdown on the parent MLflow run."""
    table = sweep_table(members, results)
    get_run_logger().info("sweep results:\n%s", table.to_string(index=False))
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    create_table_artifact(records, key="sweep-results", description="the book's models, side by side")
    mlflow_client = client()
    mlflow_client.log_text(parent_run_id, table.to_csv(index=False), "sweep.csv")
    mlflow_client.log_text(parent_run_id, table.to_markdown(index=False), "sweep.md")
    return records
