"""Text generation: the book's greedy `predict_ch8`, plus temperature and top-k sampling, for many prompts at once.

The prompts warm the state up in one call per distinct prompt length; then all prompts advance together, one model
call per generated token for the whole batch, and the tokens are read back to the host once at the end.
"""

from __future__ import annotations

import torch

from rnnlm.model import RNNLM
from rnnlm.tokens import Vocab, join_tokens, split_tokens

MAX_PREDS = 10_000
SAMPLING_DEFAULTS = {"num_preds": 50, "temperature": 1.0, "top_k": 1, "seed": 0}  # a served model's defaults
MAX_TOP_K = 2**31 - 1  # any top_k >= the vocabulary's size means no truncation


class GenerationError(ValueError):
    """A generation request that cannot be served; the message says what was wrong."""


def check_request(prompts: list[str], num_preds: int, temperature: float, top_k: int) -> None:
    """Validate a generation request before any model work."""
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise GenerationError("give a non-empty list of prompt strings")
    if isinstance(num_preds, bool) or not isinstance(num_preds, int) or not 0 <= num_preds <= MAX_PREDS:
        raise GenerationError(f"num_preds must be an integer from 0 to {MAX_PREDS:,}, got {num_preds!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise GenerationError(f"temperature must be a number > 0, got {temperature!r} (use top_k=1 for greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise GenerationError(f"top_k must be an integer >= 1 (1 = greedy argmax), got {top_k!r}")


def prompt_ids(prompt: str, vocab: Vocab, tokenization: str) -> list[int]:
    """Indices of a prompt's tokens; a prompt with no tokens or with tokens outside the vocabulary is refused."""
    tokens = split_tokens(prompt, tokenization)
    if not tokens:
        raise GenerationError("a prompt needs at least one token")
    if unknown := vocab.unknown(tokens):
        raise GenerationError(
            f"prompt {prompt!r} has tokens outside the vocabulary: {unknown}; the model knows "
            f"{len(vocab)} tokens (for the book's corpus: lowercase letters and space)"
        )
    return vocab.to_ids(tokens)


@torch.no_grad()
def generate(
    model: RNNLM,
    vocab: Vocab,
    prompts: list[str],
    num_preds: int = 50,
    tokenization: str = "char",
    temperature: float = 1.0,
    top_k: int = 1,
    seed: int | None = None,
) -> list[str]:
    """Continue each prompt by `num_preds` tokens; returns prompt + continuation for each.

    `top_k=1` is the book's greedy argmax (deterministic, no randomness used); otherwise tokens are sampled from the
    softmax of logits / `temperature`, restricted to the `top_k` most likely, with a generator seeded by `seed`.
    """
    check_request(prompts, num_preds, temperature, top_k)
    ids = [prompt_ids(p, vocab, tokenization) for p in prompts]
    model.eval()
    device = next(model.parameters()).device
    logits, state = _warm_up(model, ids, device)  # (batch, vocab_size)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    outputs = []
    for _ in range(num_preds):
        next_ids = _pick(logits, temperature, top_k, generator)  # (batch,)
        outputs.append(next_ids)
        logits, state = model(next_ids[:, None], state)
    new = torch.stack(outputs, dim=1).tolist() if outputs else [[] for _ in prompts]
    return [join_tokens(vocab.to_tokens(p + n), tokenization) for p, n in zip(ids, new, strict=True)]


def _warm_up(model: RNNLM, ids: list[list[int]], device: torch.device):
    """Feed the prompts through the model, one call per distinct prompt length (no padding, so every state is exact);
    return the last logits (batch, vocab_size) and the states, in prompt order, stacked as one batch."""
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(ids):
        by_length.setdefault(len(prompt), []).append(row)
    order, logits, states = [], [], []
    for rows in by_length.values():
        tokens = torch.tensor([ids[r] for r in rows], device=device)  # (group, length)
        out, state = model(tokens, model.begin_state(len(rows), device))  # out: (length * group, vocab_size)
        order += rows
        logits.append(out[-len(rows) :])  # time-major: the last step's rows
        states.append(state)
    back = torch.argsort(torch.tensor(order, device=device))  # from grouped order to prompt order
    if isinstance(states[0], tuple):
        state = tuple(torch.cat(parts, dim=1)[:, back] for parts in zip(*states, strict=True))
    else:
        state = torch.cat(states, dim=1)[:, back]
    return torch.cat(logits)[back], state


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax for top_k=1, else a draw from the tempered, top-k-truncated softmax."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values / temperature, dim=-1)
    return indices.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
