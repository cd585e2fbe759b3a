"""NT-ASGD's averaged weights (AWD-LSTM, Merity et al. 2017): plain SGD until the validation perplexity stalls, then a
running average of the weights after every step; the average is what is evaluated, kept as the best, saved and
registered, while training goes on from the weights SGD gives. The average lives in the TrainState, so a checkpoint
carries it and a resumed run averages on exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rnnlm.state import TrainState


def start(model: nn.Module, state: TrainState) -> None:
    """Begin averaging from the weights as they are now (the first step after replaces them)."""
    state.average = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.averaged_steps = 0


@torch.no_grad()
def update(model: nn.Module, state: TrainState) -> None:
    """Fold the weights after a step into the running average (nothing before averaging started)."""
    if state.average is None:
        return
    state.averaged_steps += 1
    for name, p in model.named_parameters():
        state.average[name].lerp_(p, 1 / state.averaged_steps)


@contextmanager
def averaged(model: nn.Module, state: TrainState) -> Iterator[dict[str, torch.Tensor] | None]:
    """The block sees `model` with the averaged weights once averaging started, and gets a copy of the training
    weights (a state_dict) to save beside them; the training weights are back after it. None and no change before."""
    if state.average is None:
        yield None
        return
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    _load(model, state.average)
    try:
        yield weights
    finally:
        _load(model, weights)


def finish(model: nn.Module, state: TrainState) -> None:
    """Leave `model` with the averaged weights, if averaging started, when training ends."""
    if state.average is not None:
        _load(model, state.average)


@torch.no_grad()
def _load(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(weights[name])
