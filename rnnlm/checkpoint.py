"""Self-describing checkpoints: state_dicts plus plain data (config, vocab, epoch, metrics), never a pickled module.

Loading uses `torch.load(weights_only=True)`, which refuses any object but tensors and plain containers, so a
checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rnnlm.model import RNNLM
from rnnlm.vocab import Vocab

FORMAT_VERSION = 1


def save_checkpoint(path: Path, **content: Any) -> Path:
    """Write `content` (state_dicts and plain data) atomically: a temporary file in the same folder, then a rename,
    so that a crash never leaves a half-written checkpoint under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format_version": FORMAT_VERSION, **content}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
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
    model = RNNLM(len(vocab), config["num_hiddens"], config["rnn"], config["num_layers"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), vocab, config
