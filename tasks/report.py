"""Reporting tasks: the perplexity curve, and the run's summary and per-epoch table in the Prefect UI."""

from __future__ import annotations

import threading
from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm import paths
from rnnlm.config import TrainConfig
from rnnlm.plot import plot_perplexity
from rnnlm.run import FitResult
from tracking.store import run_link

_PLOTTING = threading.Lock()


def _plot_alone(history, path, title, kept) -> str:
    """One plot at a time in this process: sweeps run members on threads, and matplotlib's text layout is not
    thread-safe. (A function, not the task, holds the lock: Prefect may pickle a task's code, and a lock cannot be.)"""
    with _PLOTTING:
        return str(plot_perplexity(history, path, title, kept))


@task(name="plot-perplexity", task_run_name="plot-perplexity", cache_policy=NO_CACHE)
def plot_history(config: TrainConfig, run_id: str, result: FitResult) -> str:
    """The perplexity curve as a PNG beside the run's other local outputs."""
    title = f"{config.rnn.upper()} {config.num_hiddens}, lr {config.lr}, {config.num_epochs} epochs"
    folder = paths.cache_dir(config.cache_dir) / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    kept = None
    if result.registered == "best" and result.registered_val_perplexity is not None:
        kept = (result.registered_epoch, result.registered_val_perplexity)
    return _plot_alone(result.history, folder / "perplexity.png", title, kept)


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report(config: TrainConfig, run_id: str, result: FitResult, samples: dict, tracking_uri: str) -> None:
    """Prefect UI artifacts: a markdown summary (metrics, samples, MLflow link) and the per-epoch metrics table."""
    link = run_link(run_id)
    create_link_artifact(link, link_text=f"MLflow run {run_id}", key="mlflow-run", description="this run in MLflow")

    lines = [
        f"# {config.rnn.upper()} language model, run `{run_id}`",
        f"MLflow store `{tracking_uri}`; run in the MLflow UI: [{run_id}]({link})",
        "",
        f"This run {result.describe_registered(config.tokenization)}."
        + (f" Training stopped early: {result.stopped}." if result.stopped else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in result.table()),
        "",
        "## Samples",
    ]
    for name, texts in samples.items():
        lines += [f"**{name}**", ""] + [f"- `{text}`" for text in texts.values()] + [""]
    create_markdown_artifact("\n".join(lines), key="training-report", description="metrics and samples")
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(s).items()} for s in result.history]
    create_table_artifact(rows, key="epoch-metrics", description="per-epoch metrics")
