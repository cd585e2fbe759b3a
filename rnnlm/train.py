"""Training and evaluation: the book's `train_ch8` loop without its per-batch host round trips.

Per batch the book reads the loss back as a Python float and computes the clipping norm in Python; here the loss is
accumulated on the device and clipping is torch's fused global-norm clip, so the host waits for the device once per
epoch. The arithmetic is the book's: mean cross-entropy, SGD, gradient norm clipped to theta.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rnnlm import cpu
from rnnlm.batches import as_tensor, eval_batches, random_batches, sequential_batches
from rnnlm.config import TrainConfig
from rnnlm.model import RNNLM, detach_state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class EpochStats:
    """What one epoch measured; `val_perplexity` is None on epochs without evaluation."""

    epoch: int  # 1-based, as printed by the book
    train_perplexity: float
    tokens_per_sec: float
    seconds: float
    val_perplexity: float | None = None

    def metrics(self) -> dict[str, float]:
        """The numeric fields worth logging, without the missing ones."""
        return {k: v for k, v in asdict(self).items() if k != "epoch" and v is not None}


@dataclass
class TrainState:
    """Everything that changes during training and must survive a checkpoint."""

    epoch: int = 0  # epochs completed
    history: list[EpochStats] = field(default_factory=list)
    best_val_perplexity: float | None = None


def make_optimizer(model: RNNLM, lr: float) -> torch.optim.Optimizer:
    """The book's plain SGD."""
    return torch.optim.SGD(model.parameters(), lr=lr)


def train(
    model: RNNLM,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: TrainState | None = None,
    on_epoch: Callable[[EpochStats, TrainState], None] | None = None,
    save: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train from `state.epoch` to `config.num_epochs` with `config`'s hyperparameters, calling `on_epoch` after each
    epoch.

    `generator` (CPU) draws the data offsets and shuffles, so a seeded generator makes CPU runs repeat exactly.
    `save(state)` is called every `config.checkpoint_every` epochs and after the last one, before `on_epoch`. Ctrl-C
    (SIGINT) stops at the end of the current epoch: `save` is called there and KeyboardInterrupt raised; a second
    Ctrl-C stops at once. Raises TrainingDiverged, naming the epoch, as soon as an epoch's loss is not finite.
    """
    state = state or TrainState()
    device = next(model.parameters()).device
    train_tokens, val_tokens = as_tensor(train_ids, device), as_tensor(val_ids, device)
    with _sigint_deferred() as interrupted:
        for epoch in range(state.epoch + 1, config.num_epochs + 1):
            stats = _train_one_epoch(model, train_tokens, val_tokens, config, optimizer, generator, state, epoch)
            due = epoch == config.num_epochs or epoch % config.checkpoint_every == 0
            if save is not None and due:
                save(state)
            if on_epoch is not None:
                on_epoch(stats, state)
            if interrupted():
                if save is not None and not due:
                    save(state)
                raise KeyboardInterrupt(f"interrupted after epoch {epoch}; checkpoint saved, run again to resume")
    return state


def _train_one_epoch(model, train_tokens, val_tokens, config, optimizer, generator, state, epoch) -> EpochStats:
    """One epoch plus its evaluation; updates `state` (epoch, history, best validation perplexity)."""
    perplexity, speed, seconds = train_epoch(model, train_tokens, config, optimizer, generator)
    if not math.isfinite(perplexity):
        raise TrainingDiverged(
            f"training diverged at epoch {epoch}: the perplexity is {perplexity}; lower --lr (now {config.lr}) "
            f"or --grad_clip (now {config.grad_clip})"
        )
    stats = EpochStats(epoch, perplexity, speed, seconds)
    if len(val_tokens) > 1 and (epoch % config.eval_every == 0 or epoch == config.num_epochs):
        stats.val_perplexity = evaluate(
            model, val_tokens, config.batch_size, config.num_steps, cpu_threads=config.cpu_threads
        )
        best = state.best_val_perplexity
        state.best_val_perplexity = stats.val_perplexity if best is None else min(best, stats.val_perplexity)
    state.epoch = epoch
    state.history.append(stats)
    return stats


@contextmanager
def _sigint_deferred() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop reads at the epoch's end (a consistent point to checkpoint); the
    second one interrupts at once. Where Python cannot take signals (a Prefect task in a worker pool), Ctrl-C keeps
    its usual effect and the last periodic checkpoint is what remains."""
    seen: list[int] = []

    def handler(signum, frame) -> None:
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # signals are not this caller's to take
        yield lambda: False
        return
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def train_epoch(
    model: RNNLM,
    corpus: torch.Tensor,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[float, float, float]:
    """One pass over `corpus`; returns (training perplexity, tokens per second, seconds)."""
    model.train()
    device = corpus.device
    batches = random_batches if config.use_random_iter else sequential_batches
    start = time.perf_counter()
    loss_sum, num_tokens, hidden = torch.zeros((), device=device), 0, None
    with cpu.settings(config.cpu_threads, model, (config.batch_size, config.num_steps)):
        for inputs, targets in batches(corpus, config.batch_size, config.num_steps, generator):
            if hidden is None or config.use_random_iter:
                hidden = model.begin_state(inputs.shape[0], device)
            else:
                hidden = detach_state(hidden)
            loss, hidden = _step(model, inputs, targets, hidden, optimizer, config)
            loss_sum += loss * targets.numel()  # stays on the device: no host sync per batch
            num_tokens += targets.numel()
    mean_loss = float(loss_sum) / num_tokens  # the epoch's single host sync
    seconds = time.perf_counter() - start
    return perplexity_of(mean_loss), num_tokens / seconds, seconds


def _step(model: RNNLM, inputs, targets, hidden, optimizer, config: TrainConfig):
    """Forward, backward, clip, SGD step for one minibatch; returns (detached mean loss, state), without a sync.
    Where the CPU engine has the whole step compiled (the bf16 LSTM), it takes it."""
    if (compiled := cpu.sgd_step(model, optimizer, inputs, targets, hidden, config.grad_clip, config.amp)) is not None:
        return compiled
    with autocast(inputs.device, config.amp):  # the forward pass only; gradients and SGD stay float32
        loss, hidden = model.loss(inputs, targets, hidden)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
    optimizer.step()
    return loss.detach(), hidden


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when `enabled` (weights, SGD and the loss stay float32); a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: RNNLM, corpus: torch.Tensor, batch_size: int, num_steps: int, cpu_threads: int = 0) -> float:
    """Perplexity of `corpus`, predicting every token from all before it (state carried), without training."""
    model.eval()
    loss_sum, num_tokens, hidden = torch.zeros((), device=corpus.device), 0, None
    with cpu.settings(cpu_threads, model, (batch_size, num_steps)):
        for inputs, targets in eval_batches(corpus, batch_size, num_steps):
            hidden = model.begin_state(inputs.shape[0], corpus.device) if hidden is None else hidden
            loss, hidden = model.loss(inputs, targets, hidden, reduction="sum")
            loss_sum += loss
            num_tokens += targets.numel()
    return perplexity_of(float(loss_sum) / num_tokens)


def perplexity_of(mean_loss: float) -> float:
    """exp(mean cross-entropy); inf when that overflows a float, nan when the loss is nan."""
    return math.exp(mean_loss) if mean_loss < 709.0 or math.isnan(mean_loss) else math.inf
