"""Training and sampling tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rnnlm.config import TrainConfig
from rnnlm.data import PreparedData
from rnnlm.generate import MAX_TOP_K, prompts_for, sample_many
from rnnlm.run import FitResult, fit
from rnnlm.train import TrainingDiverged
from tracking.progress import TrainingProgress
from tracking.retries import retry_if
from tracking.runs import TrackedRun

# top_k=1 is greedy; a top_k at least the vocabulary's size samples from the whole distribution
SAMPLING = {
    "greedy": {"top_k": 1},
    "t0.8-top5": {"temperature": 0.8, "top_k": 5},
    "t1.0-all": {"temperature": 1.0, "top_k": MAX_TOP_K},
}


@task(
    name="train-model",
    task_run_name="train-{config.rnn}-{config.num_hiddens}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    # I/O, the device or the tracking store may do better a second time; bad input (DataError, CheckpointMismatch
    # and CorpusError are ValueErrors) and divergence would only happen again
    retry_condition_fn=retry_if(lambda err: not isinstance(err, ValueError | TrainingDiverged)),
)
def train_model(config: TrainConfig, data: PreparedData, tracked: TrackedRun) -> FitResult:
    """Train, logging progress and per-epoch metrics to MLflow; a retry of this task, or a later run of the same
    command after a crash, continues from the run's checkpoint and logs only the epochs MLflow does not have yet."""
    progress = TrainingProgress(config, tracked.run_id)
    try:
        result = fit(config, data, Path(tracked.checkpoint), progress.hooks(), run_id=tracked.run_id)
    finally:
        progress.metrics.flush()  # what was measured before a failure is kept
    logger = get_run_logger()
    logger.info(
        "trained %d epochs (%d steps) on %s with %s, matmuls: %s; train perplexity %.2f, %s tokens/s",
        result.epochs, result.steps, result.device, result.engine, result.matmuls, result.train_perplexity,
        f"{result.tokens_per_sec:,.0f}",
    )  # fmt: skip
    if result.stopped:
        logger.info("stopped before epoch %d: %s", config.num_epochs, result.stopped)
    logger.info("this run %s", result.describe_registered(config.tokenization))
    return result


@task(name="generate-samples", task_run_name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(config: TrainConfig, result: FitResult, data: PreparedData) -> dict:
    """Greedy samples, plus sampled ones (temperature, top-k), from the last weights, for the book's two prompts on
    the book's corpus and for prompts from the held-out text on any other (`prompts_for`); where the registered
    weights are others (the best by validation), their greedy and t0.8-top5 samples too, as `best-greedy` and
    `best-t0.8-top5`. Returns setting -> {prompt: text}."""
    settings = {name: {"seed": config.seed, **options} for name, options in SAMPLING.items()}
    prompts = prompts_for(data, config.tokenization)
    samples = sample_many(Path(result.checkpoint), prompts, config.num_preds, settings)
    for text in samples["greedy"].values():
        get_run_logger().info("sample: %s", text)
    if result.registered_checkpoint and result.registered_checkpoint != result.checkpoint:
        kept = {f"{result.registered}-{name}": settings[name] for name in ("greedy", "t0.8-top5")}
        samples |= sample_many(Path(result.registered_checkpoint), prompts, config.num_preds, kept)
        for text in samples[f"{result.registered}-greedy"].values():
            get_run_logger().info("sample (%s weights): %s", result.registered, text)
    return samples
