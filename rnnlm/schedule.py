"""The learning rate of a training as one rule, asked at the moments the rate may change (nanoGPT's `get_lr`, with
pytorch/examples' `lr /= 4` at a stale evaluation folded in)."""

from __future__ import annotations

import math

from rnnlm.config import TrainConfig


class Schedule:
    """The one learning-rate rule of a training: 'constant' (the book), 'cosine' from `lr` to `lr_min` after a linear
    warmup (over the planned steps, or the time budget when that is what ends training first), or 'plateau': `lr`,
    divided by `lr_decay` after each evaluation that finds no lower validation perplexity."""

    MOMENTS = ("start", "step", "improved", "stale")  # when the loop asks: before training, after a step, after an
    # evaluation that found the best weights so far, or after one that did not

    def __init__(self, config: TrainConfig, total_steps: int):
        self.config, self.total = config, max(total_steps, 1)

    def rate(self, moment: str, lr: float | None, step: int, seconds: float) -> float:
        """The rate to train with at `moment` (one of MOMENTS), from the current rate `lr` (None before the first
        start), after `step` optimizer steps and `seconds` of training. A resumed training starts at its saved rate."""
        config = self.config
        if moment == "start" and lr is not None:
            return lr
        if config.lr_schedule == "cosine" and moment in ("start", "step"):
            return self._cosine(step, seconds)
        if config.lr_schedule == "plateau" and moment == "stale":
            return lr / config.lr_decay
        return config.lr if lr is None else lr

    def _cosine(self, step: int, seconds: float) -> float:
        """The cosine schedule's rate after `step` steps and `seconds` of training."""
        config = self.config
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(self.total - config.warmup_steps, 1)
        if config.max_minutes:
            progress = max(progress, seconds / (60 * config.max_minutes))
        progress = min(progress, 1.0)
        return config.lr_min + (config.lr - config.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
