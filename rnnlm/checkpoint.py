"""Self-describing checkpoints: state_dicts plus plain data (config, vocab, epoch, metrics), never a pickled module;
where a training's checkpoints go, and how a training resumes from one.

Loading uses `torch.load(weights_only=True)`, which refuses any object but tensors and plain containers, so a
checkpoint from an untrusted source cannot run code. Random number generator states are stored in the same plain
form (lists and byte tensors), so a resumed run draws exactly the numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnlm import paths
from rnnlm.atomic import replacing
from rnnlm.config import TrainConfig
from rnnlm.model import RNNLM, build_model
from rnnlm.state import EpochStats, TrainState
from rnnlm.tokens import Vocab

FORMAT_VERSION = 2


class CheckpointMismatch(ValueError):
    """A checkpoint was made for another config or vocabulary; the message lists what differs."""


def save_checkpoint(path: Path, **content: Any) -> Path:
    """Write `content` (state_dicts and plain data) atomically: a temporary file in the same folder, flushed to disk,
    then a rename, so that a crash never leaves a half-written checkpoint under the final name."""
    path = Path(path)
    with replacing(path, suffix=".tmp") as tmp, open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **content}, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the bytes (power loss)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; anything that would need unpickling code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError and friends with long messages
        raise ValueError(f"{path} is not a loadable rnnlm checkpoint (refused by weights_only loading): {err}") from err


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> tuple[RNNLM, Vocab, dict]:
    """Rebuild the model (in eval mode), its vocabulary and its config from a loaded checkpoint."""
    config, vocab = ckpt["config"], Vocab(ckpt["vocab"], ckpt.get("tokenizer"))
    model = build_model(config, len(vocab))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), vocab, config


# --- random number generators ---------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a run draws from (python, numpy, torch, CUDA, the data generator) as weights_only-loadable data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back what `rng_state` saved; `generator` is the data generator to restore in place."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- compatibility ---------------------------------------------------------------------------------------------


def differences(ckpt: dict[str, Any], config: dict[str, Any], vocab: Vocab, fields: list[str]) -> list[str]:
    """What keeps `ckpt` from continuing a run of `config` on `vocab`: one readable line per differing thing."""
    saved = ckpt.get("config", {})
    found = [
        f"{name}: checkpoint {saved.get(name)!r}, this run {config.get(name)!r}"
        for name in fields
        if saved.get(name) != config.get(name)
    ]
    if ckpt.get("vocab") != vocab.tokens:
        found.append(_vocab_difference(ckpt.get("vocab") or [], vocab.tokens))
    return found


def _vocab_difference(saved: list[str], current: list[str]) -> str:
    if len(saved) != len(current):
        return f"vocab: checkpoint has {len(saved)} tokens, this run {len(current)}"
    index = next(i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
    return f"vocab: token {index} is {saved[index]!r} in the checkpoint, {current[index]!r} in this run"


def check_compatible(path: Path, ckpt: dict[str, Any], config: dict[str, Any], vocab: Vocab, fields: list[str]) -> None:
    """Raise CheckpointMismatch, listing every difference, if `ckpt` cannot continue this run."""
    if found := differences(ckpt, config, vocab, fields):
        raise CheckpointMismatch(
            f"the checkpoint {path} was made for another run ({'; '.join(found)}); use the settings it was made "
            "with, or start over with --resume never (or delete the file)"
        )


# --- where a training's checkpoints go ----------------------------------------------------------------------------


def checkpoint_folder(config: TrainConfig, corpus_sha1: str) -> Path:
    """Where resumable checkpoints of this training go: keyed by the corpus content and every field that identifies
    a training, so that the same command finds its interrupted run and any other config never does."""
    return paths.cache_dir(config.cache_dir) / "checkpoints" / paths.key_of(corpus_sha1, config.identity())


def run_checkpoint(config: TrainConfig, corpus_sha1: str, run_id: str) -> Path:
    """The resumable checkpoint of one tracked run: `<checkpoint folder>/<run id>/model.pt`."""
    return checkpoint_folder(config, corpus_sha1) / run_id / "model.pt"


def best_checkpoint(checkpoint_path: Path) -> Path:
    """Where the best weights of a training go, beside its resumable checkpoint: `best.pt`."""
    return Path(checkpoint_path).with_name("best.pt")


# --- resuming a training --------------------------------------------------------------------------------------------


def iterator_policy(config: TrainConfig) -> dict:
    """How the data iterator stands at a checkpoint: every epoch draws a fresh offset (and, for random sampling, a
    shuffle) from the data generator as it begins (`epoch_rng`); inside an epoch, `batch` minibatches are done."""
    kind = "random" if config.use_random_iter else "sequential"
    return {"kind": kind, "position": "epoch_rng and batch", "offset": "drawn per epoch from epoch_rng"}


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState) if f.name != "history")  # history: below


def state_to_checkpoint(state: TrainState) -> dict:
    """The loop's state as plain data: where it stands (inside an epoch too), the best so far, the schedule,
    per-epoch history, last metrics."""
    return {
        **{name: getattr(state, name) for name in _STATE_FIELDS},
        "history": [asdict(s) for s in state.history],
        "metrics": state.history[-1].metrics() if state.history else {},
    }


def resume(
    path: Path,
    config: TrainConfig,
    vocab: Vocab,
    model: RNNLM,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    corpus_sha1: str | None = None,
) -> TrainState:
    """Load `path` into the model, optimizer and RNGs after checking it belongs to this config, vocab and corpus.
    The model gets the weights training goes on from: under NT-ASGD's averaging, `training_weights` (the checkpoint's
    `model` is then the average, what is evaluated, and the running average goes on from it)."""
    ckpt = read_resumable(path, config, vocab, corpus_sha1, next(model.parameters()).device)
    model.load_state_dict(ckpt.get("training_weights", ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"], generator)
    history = [EpochStats(**h) for h in ckpt["history"]]
    saved = {name: ckpt[name] for name in _STATE_FIELDS if name in ckpt}  # checkpoints of earlier versions: epochs only
    if "training_weights" in ckpt and saved.get("average") is None:
        saved["average"] = {name: ckpt["model"][name].clone() for name, _ in model.named_parameters()}
    return TrainState(**saved, history=history)


def read_resumable(
    path: Path, config: TrainConfig, vocab: Vocab, corpus_sha1: str | None = None, device: str | torch.device = "cpu"
) -> dict:
    """Load a training checkpoint (weights_only) and refuse it, saying what differs, unless it continues a run of
    this config on this vocab and corpus."""
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except ValueError as err:
        raise CheckpointMismatch(f"{err}; delete it, or start over with --resume never") from err
    current = {**config.model_dump(mode="json"), "corpus_file_sha1": corpus_sha1 or ckpt.get("corpus_sha1")}
    defaults = {name: field.default for name, field in TrainConfig.model_fields.items()}  # fields added since
    saved = {**defaults, **ckpt.get("config", {}), "corpus_file_sha1": ckpt.get("corpus_sha1")}
    fields = [*config.identity(), "corpus_file_sha1"]
    check_compatible(path, {**ckpt, "config": saved}, current, vocab, fields)
    if not {"rng", "optimizer", "history"} <= ckpt.keys():
        raise CheckpointMismatch(f"{path} holds a final model, not a training state; start over with --resume never")
    return ckpt
