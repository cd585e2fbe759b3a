"""Self-describing checkpoints: state_dicts plus plain data (config, vocab, epoch, metrics), never a pickled module.

Loading uses `torch.load(weights_only=True)`, which refuses any object but tensors and plain containers, so a
checkpoint from an untrusted source cannot run code. Random number generator states are stored in the same plain
form (lists and byte tensors), so a resumed run draws exactly the numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import functools
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from rnnlm.atomic import replacing
from rnnlm.model import RNNLM
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
    config, vocab = ckpt["config"], Vocab(ckpt["vocab"])
    names = ("embedding_dim", "dropout", "tie_weights", "adaptive_cutoffs")  # options older checkpoints may lack
    options = {name: config[name] for name in names if name in config}
    model = RNNLM(len(vocab), config["num_hiddens"], config["rnn"], config["num_layers"], **options)
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


# --- ownership of a run's checkpoint by one process --------------------------------------------------------------


def _lock(path: Path) -> FileLock:
    """This process's one lock object for `path`, which any of its tasks may take or release."""
    return _lock_at(str(Path(path).resolve()))


@functools.cache  # the object must live as long as the process may hold the lock: freeing it releases the lock
def _lock_at(resolved: str) -> FileLock:
    return FileLock(resolved, thread_local=False)


_CLAIMS = threading.Lock()  # makes "is it held? take it" one step for the threads of this process


def try_lock(path: Path) -> bool:
    """Take an exclusive lock on `path` without waiting; False if anyone holds it: another process, or another thread
    or task of this one (one claim per run, between threads as between processes).

    The operating system drops the lock when the process dies, even by `kill -9`, so a crashed run never blocks its
    own resumption.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    with _CLAIMS:
        if lock.is_locked:  # this process holds it already, for another claim
            return False
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
    return True


def unlock(path: Path) -> None:
    """Release the lock its holder took with `try_lock` (nothing happens if this process does not hold it)."""
    lock = _lock(path)
    with _CLAIMS:
        if lock.is_locked:
            lock.release()
