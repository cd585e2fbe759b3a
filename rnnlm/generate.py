"""Text generation: the book's greedy `predict_ch8`, plus temperature and top-k sampling, for many prompts at once.

The prompts warm the state up in one call per distinct prompt length; then all prompts advance together, one model
call per generated token for the whole batch, and the tokens are read back to the host once at the end. Each prompt
samples from its own random stream, keyed by its request's seed and its place in that request, so a prompt's text
does not depend on which other prompts share the batch (a server batches many requests into one call).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import numpy as np
import torch

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.model import RNNLM
from rnnlm.tokens import Vocab, ids_text, split_tokens, text_ids

MAX_PREDS = 10_000
SAMPLING_DEFAULTS = {"num_preds": 50, "temperature": 1.0, "top_k": 1, "seed": 0}  # a served model's defaults
MAX_TOP_K = 2**31 - 1  # any top_k >= the vocabulary's size means no truncation
BUDGET_DEFAULTS = {"max_prompts": 256, "max_work": 100_000}  # what one served request may cost (`check_budget`)

BOOK_PROMPTS = ("time traveller", "traveller")
Stream = tuple[int, int]  # one prompt's random stream: (its request's seed, its row in that request)


class GenerationError(ValueError):
    """A generation request that cannot be served; the message says what was wrong."""


def check_request(prompts: list[str], num_preds: int, temperature: float, top_k: int, seed: int | None = None) -> None:
    """Validate a generation request before any model work."""
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise GenerationError("give a non-empty list of prompt strings")
    if isinstance(num_preds, bool) or not isinstance(num_preds, int) or not 0 <= num_preds <= MAX_PREDS:
        raise GenerationError(f"num_preds must be an integer from 0 to {MAX_PREDS:,}, got {num_preds!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise GenerationError(f"temperature must be a finite number > 0, got {temperature!r} (use top_k=1 for greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise GenerationError(f"top_k must be an integer >= 1 (1 = greedy argmax), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationError(f"seed must be an integer, got {seed!r}")


def check_budget(prompts: list[str], num_preds: int, tokenization: str, max_prompts: int, max_work: int) -> None:
    """Refuse a request over its budget: more than `max_prompts` prompts, or more than `max_work` tokens of work
    (prompts x (prompt tokens + num_preds)); the message names the limit and how to split the request."""
    if len(prompts) > max_prompts:
        raise GenerationError(
            f"{len(prompts):,} prompts in one request, over the limit of {max_prompts:,} (max_prompts); "
            f"send them in {-(-len(prompts) // max_prompts):,} requests of at most {max_prompts:,} prompts"
        )
    costs = [_most_tokens(p, tokenization) + num_preds for p in prompts]  # tokens fed + tokens generated
    if sum(costs) <= max_work:
        return
    limit = f"the limit of {max_work:,} tokens of work per request (max_work: prompts x (prompt tokens + num_preds))"
    if (largest := max(costs)) > max_work:
        where = f"prompt {costs.index(largest)} alone costs {largest:,} tokens"
        raise GenerationError(f"{where}, over {limit}; shorten it or lower num_preds")
    per_request = max_work // largest
    raise GenerationError(
        f"this request costs {sum(costs):,} tokens, over {limit}; split it into {-(-len(prompts) // per_request):,} "
        f"requests of at most {per_request:,} prompts, or lower num_preds"
    )


def _most_tokens(prompt: str, tokenization: str) -> int:
    """A prompt's tokens, or for BPE at most as many as its UTF-8 bytes (counted without its tokenizer)."""
    return len(prompt.encode("utf-8")) if tokenization == "bpe" else len(split_tokens(prompt, tokenization))


def prompt_ids(prompt: str, vocab: Vocab, tokenization: str) -> list[int]:
    """Indices of a prompt's tokens; a prompt with no tokens or with tokens outside the vocabulary is refused (a
    BPE vocabulary knows every text)."""
    if tokenization == "bpe":
        if not (ids := text_ids(prompt, vocab, tokenization)):
            raise GenerationError("a prompt needs at least one token")
        return ids
    tokens = split_tokens(prompt, tokenization)
    if not tokens:
        raise GenerationError("a prompt needs at least one token")
    if unknown := vocab.unknown(tokens):
        raise GenerationError(
            f"prompt {clip_text(repr(prompt))} has tokens outside the vocabulary: {clip_text(str(unknown))}; the model "
            f"knows {len(vocab)} tokens (for the book's corpus: lowercase letters and space)"
        )
    return vocab.to_ids(tokens)


def clip_text(text: str, limit: int = 200) -> str:
    """`text`, or its first `limit` characters and how many more there were (messages stay short)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


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
    streams: list[Stream] | None = None,
) -> list[str]:
    """Continue each prompt by `num_preds` tokens; returns prompt + continuation for each.

    `top_k=1` is the book's greedy argmax (deterministic, no randomness used); otherwise tokens are sampled from the
    softmax of logits / `temperature`, restricted to the `top_k` most likely. Prompt i draws from the stream
    (`seed`, i) (a random seed when None), or from `streams[i]` when given: a batch of several requests passes each
    prompt's own, so that every request gets the text it would get alone.
    """
    check_request(prompts, num_preds, temperature, top_k, seed)
    streams = streams if streams is not None else streams_of(seed, len(prompts))
    if len(streams) != len(prompts):
        raise GenerationError(f"{len(streams)} random streams for {len(prompts)} prompts")
    ids = [prompt_ids(p, vocab, tokenization) for p in prompts]
    model.eval()
    device = next(model.parameters()).device
    logits, state = _warm_up(model, ids, device)  # (batch, vocab_size)
    draws = _draws(streams, num_preds, device) if top_k > 1 else None  # (batch, num_preds) uniforms in [0, 1)
    outputs = []
    for step in range(num_preds):
        next_ids = _pick(logits, temperature, top_k, None if draws is None else draws[:, step])  # (batch,)
        outputs.append(next_ids)
        logits, state = model.step(next_ids, state)
    new = torch.stack(outputs, dim=1).tolist() if outputs else [[] for _ in prompts]
    return [ids_text(p + n, vocab, tokenization) for p, n in zip(ids, new, strict=True)]


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


def streams_of(seed: int | None, count: int) -> list[Stream]:
    """The random streams of one request's `count` prompts: (seed, row) for each; a random seed when None."""
    seed = secrets.randbits(63) if seed is None else seed
    return [(seed, row) for row in range(count)]


def _draws(streams: list[Stream], num_preds: int, device: torch.device) -> torch.Tensor:
    """One uniform draw in [0, 1) per prompt and generated token, (batch, num_preds), each row from its own stream
    (numpy's PCG64 seeded with the pair; seeds of any sign and size)."""
    rows = [np.random.default_rng([seed % 2**64, row]).random(num_preds, dtype=np.float32) for seed, row in streams]
    return torch.from_numpy(np.stack(rows)).to(device)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax for top_k=1, else a draw from the tempered, top-k-truncated softmax by inversion:
    the first token whose cumulative weight reaches the row's uniform draw (batch,) times the total weight."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (batch, k), largest first
    # softmax numerators, shifted (no overflow); below 1e-30 a float32 divisor rounds to 0, and all is argmax already
    weights = values.sub(values[:, :1]).div_(max(temperature, 1e-30)).exp_()
    cumulative = weights.cumsum_(dim=-1)
    chosen = torch.searchsorted(cumulative, cumulative[:, -1:] * uniforms[:, None]).clamp_(max=values.shape[-1] - 1)
    return indices.gather(-1, chosen).squeeze(-1)


# --- sampling from a saved checkpoint -----------------------------------------------------------------------------


def sample_many(checkpoint_path: Path, prompts: list[str], num_preds: int, settings: dict[str, dict]) -> dict:
    """Generate from a saved checkpoint (loaded once) under several named sampling settings: name -> {prompt: text}.
    Prompts with tokens the vocabulary lacks are left out; with none left, the two most frequent tokens prompt."""
    model, vocab, config = model_from_checkpoint(load_checkpoint(checkpoint_path))
    usable = usable_prompts(prompts, vocab, config["tokenization"])
    return {
        name: dict(
            zip(usable, generate(model, vocab, usable, num_preds, config["tokenization"], **options), strict=True)
        )
        for name, options in settings.items()
    }


def prompts_for(data, tokenization: str, count: int = 2) -> list[str]:
    """Sample prompts for a run on `data` (a `PreparedData`): the book's for The Time Machine; for any other text,
    taken from its own held-out text (validation, else test): the first two words of its first whole lines (of a
    line without spaces, as in Chinese, its first four characters), or words from the middle of the text when it
    has no lines (the book's preprocessing)."""
    from rnnlm.config import KNOWN_SHA1

    if data.corpus_sha1 in KNOWN_SHA1.values():
        return list(BOOK_PROMPTS)
    vocab, _, val_ids = data.load()
    ids = val_ids if len(val_ids) else data.load_test()
    text = ids_text(np.asarray(ids[:4000]).tolist(), vocab, tokenization)
    lines = [line.split() for line in text.split("\n")[1:-1] if line.strip()]
    if not lines:  # no line breaks: two words from inside the text
        words = text.split()[1:-1]
        lines = [words[i : i + 2] for i in range(0, len(words), max(len(words) // count, 1))]
    prompts = [" ".join(words[:2]) if len(words[0]) <= 20 else words[0][:4] for words in lines if words]
    return list(dict.fromkeys(prompts))[:count] or list(BOOK_PROMPTS)


def usable_prompts(prompts: list[str], vocab: Vocab, tokenization: str) -> list[str]:
    """The prompts whose tokens are all in `vocab` (for BPE, every non-empty one); if none is, its two most frequent
    visible tokens, one each."""
    if tokenization == "bpe":
        return [p for p in prompts if p] or [" "]
    known = [p for p in prompts if (tokens := split_tokens(p, tokenization)) and not vocab.unknown(tokens)]
    return known or [token for token in vocab.tokens[1:] if token.strip()][:2]
