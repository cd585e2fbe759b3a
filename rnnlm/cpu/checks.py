"""What the engine checks before any C call: the tensors a caller hands it (dtype, shape, the token and target ids'
range, the state's sizes) and the engine's own environment variables.

The kernels index rows by token and by target and trust every size they are given, so a bad id or a wrong shape
would write out of bounds. Each check raises the error torch's own layers raise for the same input (an id out of
range: IndexError; a state of the wrong size: RuntimeError with torch's words; a tensor of the wrong rank: ValueError;
not a tensor: TypeError), naming the tensor, also under `python -O`. An id costs one pass over the tensor.
"""

from __future__ import annotations

import os

import torch
from torch import nn

IGNORE_INDEX = -100  # torch's cross_entropy skips targets of this value


class EngineSettingError(ValueError):
    """An RNNLM_* variable of the engine holds a value it does not take (the command line shows it as one line)."""


class IdOutOfRange(IndexError, RuntimeError):
    """A token or target id outside the vocabulary: an IndexError as nn.Embedding and cross_entropy raise, and a
    RuntimeError as torch's one_hot (the book's one-hot input) raises."""


def tensor(value: object, name: str) -> torch.Tensor:
    """`value` if it is a CPU tensor, else TypeError/RuntimeError naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise RuntimeError(f"{name} is on {value.device}: the CPU engine takes CPU tensors")
    return value


def ids(values: torch.Tensor, name: str, bound: int, what: str, axes: tuple[str, ...] = ("row", "step")) -> None:
    """IdOutOfRange unless every id in `values` lies in [0, bound): one pass over them. `axes` name the dimensions
    for the message ((batch, steps) tensors: row, step)."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    if int(low) < 0 or int(high) >= bound:
        bad = ((values < 0) | (values >= bound)).nonzero()[0].tolist()
        where = ", ".join(f"{axis} {index}" for axis, index in zip(axes, bad, strict=False))
        raise IdOutOfRange(f"{name} ({where}) is {int(values[tuple(bad)])}: ids must lie in [0, {bound}) ({what})")


def tokens(model: nn.Module, values: object) -> torch.Tensor:
    """The model's (batch, steps) token ids, checked: int64 for the book's one-hot input (int32 too for an
    embedding, as nn.Embedding takes it); their range is checked where they pick rows (`window_tokens`, or the
    embedding itself)."""
    values = tensor(values, "tokens")
    if values.dim() != 2:
        raise ValueError(f"tokens must be 2-D (batch, steps), got shape {tuple(values.shape)}")
    embedded = getattr(model, "embedding", None) is not None
    if values.dtype != torch.int64 and not (embedded and values.dtype == torch.int32):
        kinds = "int64 or int32 (nn.Embedding's)" if embedded else "int64 (one_hot takes only LongTensor ids)"
        raise RuntimeError(f"tokens must be {kinds}, got {values.dtype}")
    return values


def window_tokens(values: torch.Tensor | None, rows: int, batch: int) -> torch.Tensor | None:
    """A window's (steps, batch) one-hot token ids (None for dense inputs), checked against the `rows` of the
    input table they pick and the state's `batch`, and made contiguous."""
    if values is None:
        return None
    values = tensor(values, "tokens")
    if values.dtype != torch.int64:
        raise RuntimeError(f"tokens must be int64 (one_hot takes only LongTensor ids), got {values.dtype}")
    if values.dim() != 2 or values.shape[1] != batch:
        raise ValueError(f"tokens must be (steps, {batch}) for a state of {batch} rows, got {tuple(values.shape)}")
    ids(values, "tokens", rows, "the vocabulary", axes=("step", "row"))
    return values.contiguous()


def targets(values: object, shape: torch.Size, classes: int) -> tuple[torch.Tensor, bool]:
    """The (batch, steps) target ids, checked against the tokens' `shape` and the output layer's `classes`, as
    int64; and whether any is torch's ignore_index (-100), which the compiled loss does not take."""
    values = tensor(values, "targets")
    if values.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {values.dtype} (targets)")
    if values.shape != shape:
        raise ValueError(f"targets' shape {tuple(values.shape)} does not match tokens' {tuple(shape)}: one per token")
    values = values if values.dtype == torch.int64 else values.long()
    if values.numel() == 0:
        return values, False
    low, high = (int(bound) for bound in torch.aminmax(values))
    if high >= classes or (low < 0 and not _only_ignored(values)):
        bad = values[(values >= classes) | ((values < 0) & (values != IGNORE_INDEX))][0]
        raise IdOutOfRange(f"Target {int(bad)} is out of bounds (targets; the output layer has {classes} classes)")
    return values, low == IGNORE_INDEX


def _only_ignored(values: torch.Tensor) -> bool:
    """Whether every negative target is torch's ignore_index."""
    return bool(((values < 0) & (values != IGNORE_INDEX)).sum() == 0)


def state(rnn: nn.Module, value: object, batch: int):
    """The layers' state for a batch of `batch` rows, checked as torch's layers check it: (layers, batch, H), or a
    pair of them for the LSTM, float32 like the weights."""
    expected = (rnn.num_layers, batch, rnn.hidden_size)
    if not isinstance(rnn, nn.LSTM):
        return _state_part(value, "hidden", expected, rnn)
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"the LSTM's state must be a pair (h, c) of tensors, got {type(value).__name__}")
    return tuple(_state_part(part, f"hidden[{i}]", expected, rnn) for i, part in enumerate(value))


def _state_part(value: object, name: str, expected: tuple[int, ...], rnn: nn.Module) -> torch.Tensor:
    value = tensor(value, name)
    if tuple(value.shape) != expected:
        raise RuntimeError(f"Expected {name} size {expected}, got {list(value.shape)}")
    if value.dtype != rnn.weight_hh_l0.dtype:
        raise RuntimeError(f"{name} is {value.dtype}, the layer's weights {rnn.weight_hh_l0.dtype}: they must match")
    return value


def window(model: nn.Module, tokens_in: object, state_in, targets_in: object = None):
    """Every input of a model's window checked before any C call: (tokens, state, targets as int64 or None, whether
    a target is ignored)."""
    checked = tokens(model, tokens_in)
    checked_state = state(model.rnn, state_in, checked.shape[0])
    if targets_in is None:
        return checked, checked_state, None, False
    linear = getattr(model, "linear", None)
    classes = linear.out_features if linear is not None else model.adaptive.cutoffs[-1]
    return (checked, checked_state, *targets(targets_in, checked.shape, classes))


# The engine's own variables: the values each takes, in words
_NATIVE = {"0": "the compiled kernels off", "1": "on, the default"}


def native_setting() -> bool:
    """RNNLM_NATIVE as a switch: True unless it is 0; EngineSettingError for a value it does not take."""
    value = os.environ.get("RNNLM_NATIVE", "").strip()
    if value and value not in _NATIVE:
        accepted = ", ".join(f"{key} ({words})" for key, words in _NATIVE.items())
        raise EngineSettingError(f"RNNLM_NATIVE={value!r} is not one of {accepted}")
    return value != "0"


def forced_choices(known: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """RNNLM_CPU_CHOICE (`name=candidate,...`) as a dict; EngineSettingError naming the variable and the accepted
    values for an item that is not a known choice and one of its candidates."""
    forced = {}
    for item in filter(None, (part.strip() for part in os.environ.get("RNNLM_CPU_CHOICE", "").split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in known or value not in known[name]:
            accepted = "; ".join(f"{key}={'|'.join(values)}" for key, values in known.items())
            raise EngineSettingError(f"RNNLM_CPU_CHOICE: {item!r} is not a choice the engine takes ({accepted})")
        forced[name] = value
    return forced
