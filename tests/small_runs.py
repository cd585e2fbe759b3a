"""Small, quick training configurations for the registry, serving and scheduling tests."""

from __future__ import annotations

from pathlib import Path

from rnnlm.config import TrainConfig

SMALL = dict(
    max_tokens=-1,
    val_tokens=2000,
    num_hiddens=32,
    batch_size=8,
    num_steps=10,
    num_epochs=2,
    eval_every=1,
    num_preds=20,
)


def small_config(tmp_path: Path, corpus: str, **overrides) -> TrainConfig:
    """A run of a few seconds on a small corpus, its caches under `tmp_path`."""
    return TrainConfig(**{**SMALL, "corpus": corpus, "cache_dir": str(tmp_path / "cache"), **overrides})
