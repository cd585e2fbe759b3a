"""Training, sampling and reporting tasks."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from rnnlm import experiment
from rnnlm.config import TrainConfig
from rnnlm.generate import MAX_TOP_K
from rnnlm.plot import plot_perplexity
from rnnlm.train import EpochStats, TrainingDiverged, TrainState
from tasks.tracking import MetricLogger, last_logged_epoch, run_link

# top_k=1 is greedy; a top_k at least the vocabulary's size samples from the whole distribution
SAMPLING = {
    "greedy": {"top_k": 1},
    "t0.8-top5": {"temperature": 0.8, "top_k": 5},
    "t1.0-all": {"temperature": 1.0, "top_k": MAX_TOP_K},
}


def run_folder(config: TrainConfig, run_id: str) -> Path:
    """Where a run's local outputs (checkpoint, plot) go before they are logged."""
    return experiment.cache_dir(config) / "runs" / run_id


def _worth_retrying(task, task_run, state) -> bool:
    """Retry failures a second attempt may not meet (I/O, the device, the tracking store); bad input, a mismatched
    checkpoint and divergence would only happen again."""
    try:
        state.result()
    except (ValueError, TrainingDiverged):  # DataError, CheckpointMismatch, CorpusError are ValueErrors
        return False
    except Exception:
        return True
    return False


@task(
    name="train-model",
    task_run_name="train-{config.rnn}-{config.num_hiddens}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_worth_retrying,
)
def train_model(config: TrainConfig, data: experiment.PreparedData, run_id: str) -> dict:
    """Train, logging progress and per-epoch metrics to MLflow; returns the summary and the checkpoint path.

    The run's checkpoint is written every `checkpoint_every` epochs; a retry of this task, or a later run of the same
    command after a crash, continues from it and logs only the epochs MLflow does not have yet.
    """
    logger = get_run_logger()
    metrics = MetricLogger(run_id, after_step=last_logged_epoch(run_id))
    progress = create_progress_artifact(0.0, key="training-progress", description=f"MLflow run {run_id}")

    def on_epoch(stats: EpochStats, state: TrainState) -> None:
        metrics.add(stats.metrics(), stats.epoch, int(time.time() * 1000))
        if stats.epoch % config.eval_every == 0 or stats.epoch == config.num_epochs:
            metrics.flush()
            update_progress_artifact(progress, 100.0 * stats.epoch / config.num_epochs)
            val = f"{stats.val_perplexity:.2f}" if stats.val_perplexity is not None else "-"
            logger.info(
                "epoch %d/%d  train ppl %.2f  val ppl %s  %s tokens/s",
                stats.epoch,
                config.num_epochs,
                stats.train_perplexity,
                val,
                f"{stats.tokens_per_sec:,.0f}",
            )

    def on_resume(state: TrainState) -> None:
        logger.warning(
            "resuming training from the checkpoint at epoch %d of %d (MLflow run %s continues)",
            state.epoch,
            config.num_epochs,
            run_id,
        )
        for stats in state.history:  # epochs trained before the crash that MLflow never received
            metrics.add(stats.metrics(), stats.epoch, int(time.time() * 1000))
        metrics.flush()

    checkpoint = experiment.run_checkpoint(config, data.corpus_sha1, run_id)
    try:
        result = experiment.fit(config, data, checkpoint, on_epoch=on_epoch, run_id=run_id, on_resume=on_resume)
    finally:
        metrics.flush()  # what was measured before a failure is kept
    logger.info(
        "trained %d epochs on %s, matmuls: %s; train perplexity %.2f, %s tokens/s",
        result["epochs"],
        result["device"],
        result["matmuls"],
        result["train_perplexity"],
        f"{result['tokens_per_sec']:,.0f}",
    )
    return {**result, "checkpoint": str(checkpoint)}


@task(name="generate-samples", task_run_name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(config: TrainConfig, checkpoint: str) -> dict:
    """The book's two greedy samples, plus sampled ones (temperature, top-k), for fixed prompts."""
    logger = get_run_logger()
    settings = {name: {"seed": config.seed, **options} for name, options in SAMPLING.items()}
    texts = experiment.sample_many(Path(checkpoint), list(experiment.BOOK_PROMPTS), config.num_preds, settings)
    samples = {name: dict(zip(experiment.BOOK_PROMPTS, out, strict=True)) for name, out in texts.items()}
    for text in samples["greedy"].values():
        logger.info("sample: %s", text)
    return samples


@task(name="plot-perplexity", task_run_name="plot-perplexity", cache_policy=NO_CACHE)
def plot_history(config: TrainConfig, run_id: str, history: list[dict]) -> str:
    """The perplexity curve as a PNG next to the checkpoint."""
    title = f"{config.rnn.upper()} {config.num_hiddens}, lr {config.lr}, {config.num_epochs} epochs"
    folder = run_folder(config, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    return str(plot_perplexity(history, folder / "perplexity.png", title))


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report(config: TrainConfig, run_id: str, result: dict, samples: dict, tracking_uri: str) -> None:
    """Prefect UI artifacts: a markdown summary (metrics, samples, MLflow link) and the per-epoch metrics table."""
    link = run_link(run_id)
    create_link_artifact(link, link_text=f"MLflow run {run_id}", key="mlflow-run", description="this run in MLflow")
    val = result["val_perplexity"]
    lines = [
        f"# {config.rnn.upper()} language model, run `{run_id}`",
        f"MLflow store `{tracking_uri}`; run in the MLflow UI: [{run_id}]({link})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| train perplexity | {result['train_perplexity']:.3f} |",
        f"| validation perplexity | {val:.3f} |" if val is not None else "| validation perplexity | - |",
        f"| tokens/s | {result['tokens_per_sec']:,.0f} |",
        f"| device | {result['device']} |",
        f"| matmuls | {result['matmuls']} |",
        f"| epochs | {result['epochs']} |",
        "",
        "## Samples",
    ]
    for name, texts in samples.items():
        lines += [f"**{name}**", ""] + [f"- `{text}`" for text in texts.values()] + [""]
    create_markdown_artifact("\n".join(lines), key="training-report", description="metrics and samples")
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in result["history"]]
    create_table_artifact(rows, key="epoch-metrics", description="per-epoch metrics")
