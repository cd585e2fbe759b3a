"""Train/validation splits and the book's two minibatch schemes, on tensors instead of Python lists.

Sequential partitioning (D2L `seq_data_iter_sequential`) lays the corpus, after a random offset, into `batch_size`
rows and walks along them `num_steps` columns at a time, so batch i+1 continues batch i row by row and the hidden state
can be carried over::

    corpus:  a b c d e f g h i j k l m n o p q r s t u v w x ...      (after the offset)
    rows  :  [a b c d e f g h]      X of batch 0 = columns 0..3, batch 1 = columns 4..7
             [i j k l m n o p]      Y is the same window shifted by one token
             [q r s t u v w x]

With variable windows (AWD-LSTM), the same rows are walked in windows of random lengths around `num_steps`.

Random sampling (`seq_data_iter_random`) cuts the corpus, after a random offset, into `num_steps`-long subsequences
and serves them shuffled, so neighbouring batches are unrelated and the state is reset each batch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """The corpus cannot feed the requested training; the message says what to change."""


@dataclass(frozen=True)
class Split:
    """Token arrays for training, validation and test: contiguous, non-overlapping slices of one corpus, in that
    order (test last, at the very end)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    note: str = ""


def split_corpus(ids: np.ndarray, max_tokens: int, val_tokens: int, min_train: int, test_tokens: int = 0) -> Split:
    """Training tokens from the start (at most `max_tokens`, -1 for all), then held out from the tail: the last
    `test_tokens` for test and the `val_tokens` before them for validation.

    The held-out slices are taken first, from the end, so that no choice of `max_tokens` can make them overlap.
    If the corpus holds fewer training tokens than `max_tokens`, all that is there is used and `note` says so.
    Raises DataError when fewer than `min_train` training tokens remain.
    """
    n, held_out = len(ids), val_tokens + test_tokens
    if held_out >= n:
        raise DataError(
            f"val_tokens={val_tokens:,} and test_tokens={test_tokens:,} leave nothing to train on in a corpus of "
            f"{n:,} tokens; hold out fewer"
        )
    available = n - held_out
    take = available if max_tokens == -1 else min(max_tokens, available)
    note = ""
    if max_tokens > available:
        note = f"max_tokens={max_tokens:,} but only {available:,} tokens precede the held-out ones; using them all"
    require_training_tokens(take, min_train)
    return Split(train=ids[:take], val=ids[available : n - test_tokens], test=ids[n - test_tokens :], note=note)


def require_training_tokens(available: int, min_train: int) -> None:
    """Raise DataError when `available` training tokens cannot make one minibatch of `min_train` tokens."""
    if available < min_train:
        raise DataError(
            f"the corpus gives {available:,} training tokens, fewer than the {min_train:,} needed for one minibatch "
            f"(batch_size * num_steps + num_steps + 1); use a longer corpus or smaller batch_size/num_steps"
        )


def sequential_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of sequential partitioning; X and Y are int64 of shape (batch_size, num_steps)."""
    xs, ys = _rows(corpus, batch_size, num_steps, generator)
    num_batches = xs.shape[1] // num_steps
    for i in range(0, num_batches * num_steps, num_steps):
        yield xs[:, i : i + num_steps].long(), ys[:, i : i + num_steps].long()


def variable_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of sequential partitioning in windows of AWD-LSTM's random lengths (`window_length`, drawn from
    `generator` as the epoch goes), to the rows' end; X and Y are int64 of shape (batch_size, length)."""
    xs, ys = _rows(corpus, batch_size, num_steps, generator)
    i = 0
    while i < xs.shape[1]:
        length = min(window_length(num_steps, generator), xs.shape[1] - i)
        yield xs[:, i : i + length].long(), ys[:, i : i + length].long()
        i += length


def window_length(num_steps: int, generator: torch.Generator) -> int:
    """AWD-LSTM's window length: around `num_steps` (with probability 0.95, else around half of it), normal with a
    deviation of 5 steps, at least 5 and at most 2 * num_steps."""
    centre = num_steps if float(torch.rand((), generator=generator)) < 0.95 else num_steps / 2
    length = int(torch.normal(float(centre), 5.0, (1,), generator=generator))
    return min(max(length, 5), 2 * num_steps)


def _rows(corpus: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator):
    """The corpus after a random offset (drawn from `generator`) laid into `batch_size` rows: inputs and targets,
    each (batch_size, columns)."""
    offset = int(torch.randint(0, num_steps + 1, (1,), generator=generator))
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens].view(batch_size, -1)
    ys = corpus[offset + 1 : offset + 1 + num_tokens].view(batch_size, -1)
    return xs, ys


def random_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of random sampling; X and Y are int64 of shape (batch_size, num_steps)."""
    offset = int(torch.randint(0, num_steps, (1,), generator=generator))
    num_subseqs = (len(corpus) - offset - 1) // num_steps
    starts = offset + torch.randperm(num_subseqs, generator=generator) * num_steps
    window = torch.arange(num_steps)
    for i in range(0, (num_subseqs // batch_size) * batch_size, batch_size):
        index = (starts[i : i + batch_size, None] + window).to(corpus.device)  # (batch_size, num_steps)
        yield corpus[index].long(), corpus[index + 1].long()


def num_batches(
    num_tokens: int, batch_size: int, num_steps: int, use_random_iter: bool, variable_steps: bool = False
) -> int:
    """Minibatches per epoch at offset 0 (the most any offset gives); with variable windows, how many windows of
    their mean length the rows hold (the count an epoch has on average)."""
    if use_random_iter:
        return ((num_tokens - 1) // num_steps) // batch_size
    if variable_steps:
        return round(((num_tokens - 1) // batch_size) / mean_window_length(num_steps))
    return ((num_tokens - 1) // batch_size) // num_steps


@functools.cache
def mean_window_length(num_steps: int, draws: int = 4_000) -> float:
    """The mean of `window_length` around `num_steps`, over `draws` of its lengths from a fixed seed (within about
    0.1 step): a little under num_steps, as a twentieth of the windows are around half of it."""
    generator = torch.Generator().manual_seed(0)
    return sum(window_length(num_steps, generator) for _ in range(draws)) / draws


def eval_batches(corpus: torch.Tensor, batch_size: int, num_steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The tokens of `corpus` laid into `batch_size` rows of equal length, each once as an input, sequentially, state
    carried; the last chunk may be shorter than `num_steps`. The last token is only a target, and the tail that
    does not fill a row (fewer than `batch_size` tokens) is dropped, as the book's and pytorch/examples' batchify
    drop it, so the perplexity stays comparable with theirs. Used for validation perplexity."""
    rows = max(1, min(batch_size, (len(corpus) - 1) // num_steps))
    cols = (len(corpus) - 1) // rows
    if cols < 1:
        raise DataError(f"a split of {len(corpus)} tokens is too short to evaluate; it needs at least 2")
    xs = corpus[: rows * cols].view(rows, cols)
    ys = corpus[1 : rows * cols + 1].view(rows, cols)
    for i in range(0, cols, num_steps):
        yield xs[:, i : i + num_steps].long(), ys[:, i : i + num_steps].long()


def as_tensor(ids: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A compact token array as a tensor on `device`, without copying on the CPU (memory-maps stay mapped)."""
    with warnings.catch_warnings():  # read-only memory maps are fine: training never writes to its corpus
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(ids))
    return tensor.to(device) if str(device) != "cpu" else tensor
