"""Training and evaluation: the book's `train_ch8` loop without its per-batch host round trips, plus what real
corpora need (schedules, evaluations and checkpoints inside long epochs, the best weights kept, early stopping).

Per batch the book reads the loss back as a Python float and computes the clipping norm in Python; here the loss is
accumulated on the device and clipping is torch's fused global-norm clip, so the host waits for the device once per
epoch (and at each progress line inside long ones). The default arithmetic is the book's: mean cross-entropy, plain
SGD at a constant rate, gradient norm clipped to theta.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from rnnlm import averaging, cpu
from rnnlm.batches import as_tensor, num_batches, random_batches, sequential_batches, variable_batches
from rnnlm.config import TrainConfig
from rnnlm.evaluate import evaluate, perplexity_of
from rnnlm.model import RNNLM, State, detach_state
from rnnlm.schedule import Schedule
from rnnlm.state import EpochStats, Hooks, TrainState

clock: Callable[[], float] = time.perf_counter  # the loop's clock for its times, ETAs and max_minutes (tests set it)


TINY_STATE, TINY_EVERY = 1e-30, 100  # zero_tiny_state's threshold, and how many steps apart it runs


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(model: RNNLM, lr: float, config: TrainConfig | None = None) -> torch.optim.Optimizer:
    """The run's optimizer: the book's plain SGD (also NT-ASGD's, which averages beside it), or AdamW, with the
    config's weight decay. AdamW updates every parameter in one fused kernel on CPUs and GPUs (torch's loop of
    per-tensor ops costs a tenth of a real-text step on a CPU); same arithmetic, to float rounding."""
    if config is not None and config.optimizer == "adamw":
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=fused or None)
    return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=config.weight_decay if config else 0.0)


def zero_tiny_state(optimizer: torch.optim.Optimizer) -> None:
    """Set the optimizer's CPU state below TINY_STATE to zero, before it decays into float32's subnormal range
    (1e-30 shrinks by 0.9 a step for 173 steps before it gets there; this runs every TINY_EVERY steps).

    AdamW's running mean of a weight without gradient (the embedding row of a word not seen lately) shrinks by 0.9 a
    step and turns subnormal (below 1.2e-38) some 750 steps after the word; every operation on a subnormal value
    costs an x86 CPU a microcode assist: on a 2-core Xeon, with 18% of kjv-tuned.toml's embedding state subnormal,
    torch's fused AdamW step took 36 ms instead of 8 (bench/adamw_subnormal.py). A term this small moves no weight
    by a bit (its update lies some 15 orders of magnitude below a weight's rounding). torch.set_flush_denormal would
    flush in hardware, but only on the calling thread, not on torch's OpenMP threads that run half of the step.
    """
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.is_floating_point() and value.device.type == "cpu":
                value.masked_fill_(value.abs() < TINY_STATE, 0.0)


def train(
    model: RNNLM,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: TrainState | None = None,
    hooks: Hooks | None = None,
) -> TrainState:
    """Train from `state` (an epoch boundary, or a checkpoint inside an epoch) to `config.num_epochs`, or until early
    stopping or `max_minutes` ends it, with `config`'s hyperparameters.

    `generator` (CPU) draws the data offsets and shuffles, so a seeded generator makes CPU runs repeat exactly, also
    across a checkpoint inside an epoch. Ctrl-C (SIGINT) stops after the current minibatch: `hooks.save` is called
    there and KeyboardInterrupt raised; a second Ctrl-C stops at once. Raises TrainingDiverged, naming the epoch, as
    soon as an epoch's loss is not finite.
    """
    state, hooks = state or TrainState(), hooks or Hooks()
    device = next(model.parameters()).device
    corpus, val_tokens = as_tensor(train_ids, device), as_tensor(val_ids, device)
    val_during = val_tokens[: config.val_max_tokens + 1] if config.val_max_tokens else val_tokens
    loop = _Loop(model, corpus, val_during, config, optimizer, generator, state, hooks)
    with _sigint_deferred() as interrupted:
        loop.interrupted = interrupted
        for epoch in range(state.epoch + 1, config.num_epochs + 1):
            loop.run_epoch(epoch)
            if state.stopped:
                break
    averaging.finish(model, state)  # NT-ASGD: the averaged weights are the training's result
    return state


class _Loop:
    """One training's epochs and steps: the schedule, evaluations, checkpoints and stops that happen between them."""

    def __init__(self, model, corpus, val_tokens, config: TrainConfig, optimizer, generator, state, hooks):
        self.model, self.corpus, self.val_tokens, self.config = model, corpus, val_tokens, config
        self.optimizer, self.generator, self.state, self.hooks = optimizer, generator, state, hooks
        self.per_epoch = num_batches(
            len(corpus), config.batch_size, config.num_steps, config.use_random_iter, config.variable_steps
        )
        self.schedule = Schedule(config, self.per_epoch * config.num_epochs)
        self.held = unseen_rows(model, corpus) if config.mask_unseen else []
        self.eval_seconds = 0.0  # spent in evaluations by this process: kept out of the epochs' training time
        self.interrupted: Callable[[], bool] = lambda: False
        self.epoch_val: float | None = None  # the current epoch's last validation perplexity
        self._follow_schedule("start")

    def run_epoch(self, epoch: int) -> None:
        """One epoch (or what is left of it after a checkpoint inside it), then its evaluation and checkpoint."""
        state, config = self.state, self.config
        self.model.train()
        started, seconds_before, evaluations_before = clock(), state.epoch_seconds, self.eval_seconds
        loss_sum = torch.tensor(state.epoch_loss, device=self.corpus.device, dtype=torch.float64)
        with cpu.settings(config.cpu_threads, self.model, (config.batch_size, config.num_steps), config.amp):
            for inputs, targets in self._batches():
                state.hidden = carried(self.model, state.hidden, inputs, config.use_random_iter)
                self._scale_rate(inputs.shape[1])
                loss, state.hidden = _step(self.model, inputs, targets, state.hidden, self.optimizer, config, self.held)
                averaging.update(self.model, state)
                loss_sum += loss * targets.numel()  # stays on the device: no host sync per batch
                state.epoch_tokens += targets.numel()
                state.batch, state.step = state.batch + 1, state.step + 1
                evaluations = self.eval_seconds - evaluations_before  # not training time: in state.elapsed
                state.epoch_seconds = seconds_before + clock() - started - evaluations
                if self._between_steps(epoch, loss_sum):
                    break
        self._end_epoch(epoch, float(loss_sum))  # the epoch's single host sync

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's minibatches, from the first not yet trained: the data generator is put back to where the
        epoch began (its offset and shuffle are drawn again, the same) and the batches done are skipped."""
        state = self.state
        if state.epoch_rng is None:
            state.epoch_rng = self.generator.get_state()
        else:
            self.generator.set_state(state.epoch_rng)
        return epoch_batches(self.corpus, self.config, self.generator, skip=state.batch)

    def _scale_rate(self, length: int) -> None:
        """Variable windows (AWD-LSTM): this step's rate is the schedule's scaled by its window's length / num_steps
        (the schedule sets its own rate back after the step)."""
        if self.config.variable_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.state.lr * length / self.config.num_steps

    def _between_steps(self, epoch: int, loss_sum: torch.Tensor) -> bool:
        """What is due after a step: the schedule, an evaluation, a checkpoint, a progress line, a stop; True to end
        the epoch now."""
        state, config = self.state, self.config
        self._follow_schedule("step")
        if state.step % TINY_EVERY == 0:
            zero_tiny_state(self.optimizer)
        if config.eval_every_steps and state.step % config.eval_every_steps == 0 and state.batch < self.per_epoch:
            self._evaluate(epoch)
        if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0:
            self._save(loss_sum)
        if self.per_epoch > config.progress_every and state.batch % config.progress_every == 0:
            self._progress(epoch, loss_sum)
        if self.interrupted():
            self._save(loss_sum)
            raise KeyboardInterrupt(f"interrupted in epoch {epoch} after step {state.step}; run again to resume")
        over = config.max_minutes and state.elapsed + state.epoch_seconds >= 60 * config.max_minutes
        if over and not state.stopped:
            state.stopped = f"the time budget of {config.max_minutes:g} minutes ran out in epoch {epoch}"
        return bool(state.stopped)

    def _end_epoch(self, epoch: int, loss_sum: float) -> None:
        state, config = self.state, self.config
        perplexity = perplexity_of(loss_sum / max(state.epoch_tokens, 1))
        if not math.isfinite(perplexity):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}: the perplexity is {perplexity}; lower --lr (now {config.lr}) "
                f"or --grad_clip (now {config.grad_clip})"
            )
        seconds = state.epoch_seconds
        stats = EpochStats(epoch, perplexity, state.epoch_tokens / max(seconds, 1e-9), seconds, step=state.step)
        state.elapsed += seconds
        state.epoch, state.batch, state.epoch_rng, state.hidden = epoch, 0, None, None
        state.epoch_loss, state.epoch_tokens, state.epoch_seconds = 0.0, 0, 0.0
        last = epoch == config.num_epochs or bool(state.stopped)
        if not config.eval_every_steps and (epoch % config.eval_every == 0 or last) and config.evaluates():
            self._evaluate(epoch)
        stats.val_perplexity, self.epoch_val = self.epoch_val, None  # the epoch's last evaluation, if any
        stats.lr = state.lr
        state.history.append(stats)
        if self.hooks.save is not None and (last or epoch % config.checkpoint_every == 0):
            self.hooks.save(state)
        if self.hooks.on_epoch is not None:
            self.hooks.on_epoch(stats, state)

    def _evaluate(self, epoch: int) -> float | None:
        """Validation perplexity now; keeps the best weights, tells the schedule, counts towards early stopping and
        NT-ASGD's start. Once NT-ASGD averages, the averaged weights are the ones evaluated and kept."""
        state, config = self.state, self.config
        if len(self.val_tokens) < 2:
            return None
        with averaging.averaged(self.model, state):
            started = clock()
            perplexity = evaluate(self.model, self.val_tokens, config.batch_size, config.num_steps, config.cpu_threads)
            self.model.train()
            seconds = clock() - started
            improved = self._keep_if_best(perplexity, epoch)
        state.elapsed += seconds  # the time budget (max_minutes) counts evaluations too
        self.eval_seconds += seconds
        self.epoch_val = perplexity
        self._follow_schedule("improved" if improved else "stale")
        if config.early_stopping and state.stale_evals >= config.early_stopping:
            state.stopped = f"early stopping: {state.stale_evals} evaluations without a lower validation perplexity"
        if config.optimizer == "ntasgd" and state.average is None and state.stale_evals >= config.asgd_patience:
            averaging.start(self.model, state)
        return perplexity

    def _keep_if_best(self, perplexity: float, epoch: int) -> bool:
        """Whether `perplexity` is the best so far; if so the model's weights are kept (`hooks.save_best`), else the
        evaluation counts as stale."""
        state = self.state
        improved = state.best_val_perplexity is None or perplexity < state.best_val_perplexity
        if improved:
            state.best_val_perplexity, state.best_epoch, state.best_step = perplexity, epoch, state.step
            state.stale_evals = 0
            if self.hooks.save_best is not None:
                self.hooks.save_best(state)
        else:
            state.stale_evals += 1
        return improved

    def _save(self, loss_sum: torch.Tensor) -> None:
        if self.hooks.save is not None:
            self.state.epoch_loss = float(loss_sum)
            self.hooks.save(self.state)

    def _progress(self, epoch: int, loss_sum: torch.Tensor) -> None:
        if self.hooks.on_progress is None:
            return
        state, config = self.state, self.config
        per_batch = state.epoch_seconds / state.batch
        epoch_left = (self.per_epoch - state.batch) * per_batch
        run_left = epoch_left + (config.num_epochs - epoch) * self.per_epoch * per_batch
        done = ((epoch - 1) * self.per_epoch + state.batch) / (config.num_epochs * self.per_epoch)
        if config.max_minutes:  # the time budget, if it ends the run first
            spent = state.elapsed + state.epoch_seconds
            run_left = min(run_left, max(60 * config.max_minutes - spent, 0.0))
            done = max(done, min(spent / (60 * config.max_minutes), 1.0))
        values = {
            "epoch": epoch, "batch": state.batch, "batches": self.per_epoch, "seconds_per_batch": per_batch,
            "tokens_per_sec": state.epoch_tokens / max(state.epoch_seconds, 1e-9),
            "train_perplexity": perplexity_of(float(loss_sum) / state.epoch_tokens),
            "val_perplexity": self.epoch_val, "epoch_eta_seconds": min(epoch_left, run_left),
            "run_eta_seconds": run_left, "run_done": done, "lr": state.lr,
        }  # fmt: skip
        self.hooks.on_progress(state, values)

    def _follow_schedule(self, moment: str) -> None:
        """Set the rate the schedule gives at `moment` (see `Schedule.rate`): the one place the rate changes."""
        state = self.state
        state.lr = self.schedule.rate(moment, state.lr, state.step, state.elapsed + state.epoch_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = state.lr


@contextmanager
def _sigint_deferred() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop reads after each minibatch (a consistent point to checkpoint); the
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


def epoch_batches(corpus: torch.Tensor, config: TrainConfig, generator: torch.Generator, skip: int = 0):
    """An epoch's minibatches under the config's partitioning (offset and shuffle drawn from `generator`), from
    the `skip`-th on: (inputs, targets), each (batch_size, num_steps)."""
    batches = random_batches if config.use_random_iter else sequential_batches
    batches = variable_batches if config.variable_steps else batches
    for index, batch in enumerate(batches(corpus, config.batch_size, config.num_steps, generator)):
        if index >= skip:
            yield batch


def carried(model: RNNLM, hidden: State | None, inputs: torch.Tensor, random_iter: bool) -> State:
    """The state a minibatch starts from: zeros at an epoch's start (and always under random sampling), else the
    last one's, cut from its graph (truncated BPTT)."""
    if hidden is None or random_iter:
        return model.begin_state(inputs.shape[0], inputs.device)
    return detach_state(hidden)


def unseen_rows(model: RNNLM, corpus: torch.Tensor) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The output layer's (parameter, rows) for the tokens that never occur in the training ids `corpus`."""
    counts = torch.bincount(corpus.reshape(-1), minlength=model.vocab_size)
    return model.output_rows(torch.nonzero(counts == 0).squeeze(1))


def _step(model: RNNLM, inputs, targets, hidden, optimizer, config: TrainConfig, held=()):
    """Forward, backward, clip, optimizer step for one minibatch; returns (detached mean loss, state), without a
    sync. Where the CPU engine has the whole step compiled, it takes it. `held`'s (parameter, rows) get no gradient
    (mask_unseen)."""
    compiled = None if held else cpu.sgd_step(model, optimizer, inputs, targets, hidden, config.grad_clip, config.amp)
    if compiled is not None:
        return compiled
    with autocast(inputs.device, config.amp):  # the forward pass only; gradients and the step stay float32
        loss, objective, hidden = _losses(model, inputs, targets, hidden, config)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    for parameter, rows in held:
        if parameter.grad is not None:
            parameter.grad.index_fill_(0, rows, 0.0)
    clip_and_step(model, optimizer, config.grad_clip)
    return loss.detach(), hidden


def clip_and_step(model: RNNLM, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """torch's clip_grad_norm_, then the optimizer's step. A fused AdamW takes the clip's factor inside its one pass
    over the weights (as its `grad_scale`, the way torch's GradScaler hands it the loss scale) instead of after a pass
    that scales every gradient: the same update, to float32 rounding, one memory pass fewer. Its norm is
    `cpu.total_norm`'s (on CPUs, on both cores)."""
    if not optimizer.defaults.get("fused"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        optimizer.step()
        return
    norm = cpu.total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.grad_scale = (norm + 1e-6).div(max_norm).clamp(min=1.0)  # the inverse of clip_grad_norm_'s factor
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def _losses(model: RNNLM, inputs, targets, hidden, config: TrainConfig):
    """(the mean cross-entropy, what the step minimises, the last state): the cross-entropy itself, or with AR/TAR
    the cross-entropy plus their penalties (the cross-entropy alone is what training reports)."""
    if not (config.ar_alpha or config.tar_beta):
        loss, hidden = model.loss(inputs, targets, hidden)
        return loss, loss, hidden
    loss, penalty, hidden = model.penalised_loss(inputs, targets, hidden, config.ar_alpha, config.tar_beta)
    return loss, loss + penalty, hidden


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when `enabled` (weights, SGD and the loss stay float32); a no-op otherwise, and on a
    CPU where bf16 matmuls are slower than float32 (no AVX512-BF16 for the compiled kernels: `cpu.bf16_fast`)."""
    if device.type == "cpu":
        return cpu.autocast(enabled)  # the engine's rule, under which it also chose the LSTM's path
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
