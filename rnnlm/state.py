"""What a training carries and reports: each epoch's numbers, the loop's whole state (what a checkpoint saves, inside
an epoch too), and the hooks through which a caller hears how it goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from rnnlm.model import State


@dataclass
class EpochStats:
    """What one epoch measured; `val_perplexity` is None on epochs without an evaluation at their end."""

    epoch: int  # 1-based, as printed by the book
    train_perplexity: float
    tokens_per_sec: float
    seconds: float
    val_perplexity: float | None = None
    step: int = 0  # optimizer steps taken by the end of the epoch
    lr: float = 0.0  # the learning rate at the epoch's end

    def metrics(self) -> dict[str, float]:
        """The numeric fields worth logging, without the missing ones."""
        return {k: v for k, v in asdict(self).items() if k not in ("epoch", "step") and v is not None}


@dataclass
class TrainState:
    """Everything that changes during training and must survive a checkpoint, inside an epoch too."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[EpochStats] = field(default_factory=list)
    best_val_perplexity: float | None = None
    best_epoch: int = 0  # where the best weights were taken: after `best_step` steps, in epoch `best_epoch`
    best_step: int = 0
    stale_evals: int = 0  # evaluations since the best one (plateau schedule, early stopping)
    lr: float | None = None  # the rate the schedule has set
    elapsed: float = 0.0  # seconds of training and evaluations so far (max_minutes, the cosine schedule's clock)
    stopped: str = ""  # why training ended before num_epochs, if it did
    # inside an unfinished epoch: its minibatches done, the data generator as the epoch began, the carried state
    batch: int = 0
    epoch_rng: torch.Tensor | None = None
    hidden: State | None = None
    epoch_loss: float = 0.0
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0  # training only: evaluations inside the epoch are left out
    # NT-ASGD, once averaging started: the running average of the weights (by parameter name), over this many steps
    average: dict[str, torch.Tensor] | None = None
    averaged_steps: int = 0


@dataclass
class Hooks:
    """What the caller hears while training runs (every one optional): `on_start(device, engine)` before it starts,
    `on_resume(state)` when it continues from a checkpoint, `on_epoch(stats, state)` after each epoch,
    `on_progress(state, line_values)` inside long epochs, `save(state)` where a resumable checkpoint is due, and
    `save_best(state)` when an evaluation finds the best weights so far (`rnnlm.run.fit` sets the last two)."""

    on_epoch: Callable[[EpochStats, TrainState], None] | None = None
    on_progress: Callable[[TrainState, dict], None] | None = None
    save: Callable[[TrainState], None] | None = None
    save_best: Callable[[TrainState], None] | None = None
    on_start: Callable[[str, str], None] | None = None
    on_resume: Callable[[TrainState], None] | None = None
