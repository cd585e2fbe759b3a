"""Reporting tasks: the perplexity curve, and the run's summary and per-epoch table in the Prefect UI."""

from __future__ import annotations

import threading
from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm import run
from rnnlm.config import TrainConfig
from rnnlm.plot import plot_perplexity
from tracking.store import run_link

_PLOTTING = threading.Lock()


def _plot_alone(history, path, title, kept) -> str:
    """One plot at a time in this process: sweeps run members on threads, and matplotlib's text layout is not
    thread-safe. (A function, not the task, holds the lock: Prefect may pickle a task's code, and a lock cannot be.)"""
    with _PLOTTING:
        return str(plot_perplexity(history, path, title, kept))


@task(name="plot-perplexity", task_run_name="plot-perplexity", cache_policy=NO_CACHE)
def plot_history(config: TrainConfig, run_id: str, result: run.FitResult) -> str:
    """The perplexity curve as a PNG beside the run's other local outputs."""
    title = f"{config.rnn.upper()} {config.num_hiddens}, lr {config.lr}, {config.num_epochs} epochs"
    folder = run.cache_dir(config) / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    kept = None
    if result.registered == "best" and result.registered_val_perplexity is not None:
        kept = (result.registered_epoch, result.registered_val_perplexity)
    return _plot_alone(result.history, folder / "perplexity.png", title, kept)


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report(config: TrainConfig, run_id: str, result: run.FitResult, samples: dict, tracking_uri: str) -> None:
    """Prefect UI artifacts: a markdown summary (metrics, samples, MLflow link) and the per-epoch metrics table."""
    link = run_link(run_id)
    create_link_artifact(link, link_text=f"MLflow run {run_id}", key="mlflow-run", description="this run in MLflow")

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"# {config.rnn.upper()} language model, run `{run_id}`",
        f"MLflow store `{tracking_uri}`; run in the MLflow UI: [{run_id}]({link})",
        "",
        f"This run {result.describe_registered(config.tokenization)}."
        + (f" Training stopped early: {result.stopped}." if result.stopped else ""),
        "",
        "| metric | value |",
        "|---|---|",
        f"| train perplexity (last epoch) | {result.train_perplexity:.3f} |",
        f"| validation perplexity (last weights) | {number(result.val_perplexity)} |",
        f"| validation perplexity ({result.registered} weights, registered) | "
        f"{number(result.registered_val_perplexity)} |",
        f"| test perplexity ({result.registered} weights) | {number(result.registered_test_perplexity)} |",
        f"| bits per token ({result.registered} weights) | {number(result.registered_bits_per_token)} |",
        f"| steps | {result.steps:,} |",
        f"| tokens/s | {result.tokens_per_sec:,.0f} |",
        f"| device | {result.device} |",
        f"| matmuls | {result.matmuls} |",
        f"| engine | {result.engine} |",
        f"| epochs | {result.epochs} |",
        "",
        "## Samples",
    ]
    for name, texts in samples.items():
        lines += [f"**{name}**", ""] + [f"- `{text}`" for text in texts.values()] + [""]
    create_markdown_artifact("\n".join(lines), key="training-report", description="metrics and samples")
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(s).items()} for s in result.history]
    create_table_artifact(rows, key="epoch-metrics", description="per-epoch metrics")
