"""Evaluation: the perplexity of held-out text, every token predicted from all before it, without training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnlm import cpu
from rnnlm.batches import eval_batches
from rnnlm.model import RNNLM


@torch.no_grad()
def evaluate(model: RNNLM, corpus: torch.Tensor, batch_size: int, num_steps: int, cpu_threads: int = 0) -> float:
    """Perplexity of `corpus`, predicting every token from all before it (state carried), without training
    (dropout off)."""
    return perplexity_of(evaluate_loss(model, corpus, batch_size, num_steps, cpu_threads))


@torch.no_grad()
def evaluate_loss(model: RNNLM, corpus: torch.Tensor, batch_size: int, num_steps: int, cpu_threads: int = 0) -> float:
    """The mean cross-entropy (nats a token) of `corpus`, as `evaluate` walks it."""
    model.eval()
    loss_sum, num_tokens, hidden = torch.zeros((), device=corpus.device, dtype=torch.float64), 0, None
    with cpu.settings(cpu_threads, model, (batch_size, num_steps)):
        for inputs, targets in eval_batches(corpus, batch_size, num_steps):
            hidden = model.begin_state(inputs.shape[0], corpus.device) if hidden is None else hidden
            loss, hidden = model.loss(inputs, targets, hidden, reduction="sum")
            loss_sum += loss
            num_tokens += targets.numel()
    return float(loss_sum) / num_tokens


@dataclass(frozen=True)
class TextScore:
    """How well a model predicts a text: bits per byte of the text as the model sees it (its preprocessing), and
    perplexity and bits per token in the model's own unit."""

    bits_per_byte: float | None
    perplexity: float
    bits_per_token: float
    tokens: int
    bytes: int
    unk_bytes: int
    tokenization: str
    preprocess: str


def score_file(checkpoint_path: Path, text_path: Path, batch_size: int = 32, num_steps: int = 0) -> TextScore:
    """Score a saved model on a UTF-8 text file (read in chunks; non-UTF-8 refused), after the model's own
    preprocessing and tokenization; every token predicted from all before it. `num_steps` 0: the model's."""
    from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
    from rnnlm.spans import span_bytes, span_ids

    model, vocab, config = model_from_checkpoint(load_checkpoint(checkpoint_path))
    mode, tokenization, size = config["preprocess"], config["tokenization"], Path(text_path).stat().st_size
    ids = np.concatenate([np.zeros(0, dtype=np.int64), *span_ids(text_path, 0, size, mode, tokenization, vocab)])
    if len(ids) < 2:
        raise ValueError(f"{text_path} holds {len(ids)} tokens after '{mode}' preprocessing; a score needs 2 or more")
    loss = evaluate_loss(model, torch.from_numpy(ids.astype(np.int64)), batch_size, num_steps or config["num_steps"])
    held = span_bytes(text_path, 0, size, mode, tokenization, vocab)
    return TextScore(
        bits_per_byte=bits_per_byte(loss, len(ids), held.num_bytes, held.unk_bytes),
        perplexity=perplexity_of(loss),
        bits_per_token=loss / math.log(2),
        tokens=len(ids),
        bytes=held.num_bytes,
        unk_bytes=held.unk_bytes,
        tokenization=tokenization,
        preprocess=mode,
    )


def bits_per_byte(mean_loss: float, num_tokens: int, num_bytes: int, unk_bytes: int = 0) -> float | None:
    """Bits per byte of held-out text: its tokens' mean cross-entropy (nats a token) in bits, times its tokens, plus
    8 bits for every byte of text the vocabulary mapped to `<unk>` (a model never gains by not knowing a word: it
    pays for spelling it, at the cost of bytes sent as they are), over the text's UTF-8 bytes after preprocessing.
    For characters of ASCII text (the book) this is bits per character. None for text of no bytes."""
    if num_bytes <= 0:
        return None
    return (mean_loss / math.log(2) * num_tokens + 8 * unk_bytes) / num_bytes


def perplexity_of(mean_loss: float) -> float:
    """exp(mean cross-entropy); inf when that overflows a float, nan when the loss is nan."""
    return math.exp(mean_loss) if mean_loss < 709.0 or math.isnan(mean_loss) else math.inf
