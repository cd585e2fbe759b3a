"""What a training task reports while it trains: per-epoch metrics to MLflow, a log line and the Prefect progress
bar every `eval_every` epochs and every `progress_every` steps inside long epochs (with tokens/s and an ETA), and
the epochs a resumed run trained before MLflow heard of them."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from rnnlm.config import TrainConfig
from rnnlm.state import EpochStats, Hooks, TrainState
from tracking.runs import last_logged_epoch
from tracking.store import MetricLogger


class TrainingProgress:
    """The hooks `rnnlm.run.fit` takes (`hooks()`), reporting to the log, MLflow and Prefect."""

    def __init__(self, config: TrainConfig, run_id: str):
        self.config, self.run_id, self.logger = config, run_id, get_run_logger()
        self.metrics = MetricLogger(run_id, after_step=last_logged_epoch(run_id))
        self.steps = MetricLogger(run_id)  # inside epochs, by optimizer step: step_train_perplexity, step_lr, ...
        self.bar = create_progress_artifact(0.0, key="training-progress", description=f"MLflow run {run_id}")

    def hooks(self) -> Hooks:
        """These reports as the training's hooks."""
        return Hooks(
            on_epoch=self.on_epoch, on_progress=self.on_progress, on_start=self.on_start, on_resume=self.on_resume
        )

    def on_epoch(self, stats: EpochStats, state: TrainState) -> None:
        self.metrics.add(stats.metrics(), stats.epoch, int(time.time() * 1000))
        if stats.epoch % self.config.eval_every == 0 or stats.epoch == self.config.num_epochs:
            self.metrics.flush()
            update_progress_artifact(self.bar, 100.0 * stats.epoch / self.config.num_epochs)
            val = f"{stats.val_perplexity:.2f}" if stats.val_perplexity is not None else "-"
            self.logger.info(
                "epoch %d/%d  train ppl %.2f  val ppl %s  %s tokens/s",
                stats.epoch, self.config.num_epochs, stats.train_perplexity, val, f"{stats.tokens_per_sec:,.0f}",
            )  # fmt: skip

    def on_progress(self, state: TrainState, values: dict) -> None:
        """A line inside a long epoch: where it stands, its speed, when the epoch and the run should end."""
        config, batches = self.config, values["batches"]
        update_progress_artifact(self.bar, 100.0 * values["run_done"])
        val = values.get("val_perplexity")
        self.logger.info(
            "epoch %d/%d batch %d/%d  train ppl %.2f%s  lr %.3g  %s tokens/s  epoch ETA %s, run ETA %s",
            values["epoch"], config.num_epochs, values["batch"], batches, values["train_perplexity"],
            f"  val ppl {val:.2f}" if val is not None else "", values["lr"], f"{values['tokens_per_sec']:,.0f}",
            _duration(values["epoch_eta_seconds"]), _duration(values["run_eta_seconds"]),
        )  # fmt: skip
        names = ("train_perplexity", "val_perplexity", "lr", "tokens_per_sec")
        step_metrics = {f"step_{name}": values[name] for name in names if values.get(name) is not None}
        self.steps.add(step_metrics, state.step, int(time.time() * 1000))
        self.steps.flush()

    def on_start(self, device: str, engine: str) -> None:
        self.logger.info("training on %s with %s", device, engine)

    def on_resume(self, state: TrainState) -> None:
        self.logger.warning(
            "resuming training from the checkpoint at epoch %d of %d (MLflow run %s continues)",
            state.epoch, self.config.num_epochs, self.run_id,
        )  # fmt: skip
        for stats in state.history:  # epochs trained before the crash that MLflow never received
            self.metrics.add(stats.metrics(), stats.epoch, int(time.time() * 1000))
        self.metrics.flush()


def _duration(seconds: float) -> str:
    """Seconds as '1h02m', '3m05s' or '42s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
