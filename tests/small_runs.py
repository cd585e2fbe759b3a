"""Small, quick training configurations for the registry, serving and scheduling tests (conftest's, a bit wider)."""

from __future__ import annotations

from pathlib import Path

import conftest

from rnnlm.config import TrainConfig

SMALL = conftest.SMALL_TRAINING | {"num_hiddens": 32, "num_preds": 20}


def small_config(tmp_path: Path, corpus: str, **overrides) -> TrainConfig:
    """A run of a few seconds on a small corpus, its caches under `tmp_path`."""
    return conftest.small_config(tmp_path, corpus, **(SMALL | overrides))
