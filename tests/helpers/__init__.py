"""What the tests share: made-up corpora, small training configurations, where the real corpus is.

Service helpers (PostgreSQL, `mlflow server`, `prefect server start`, commands as services) are in
`helpers.services`.
"""

from __future__ import annotations

import random
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_CORPUS = PROJECT_ROOT.parent / "shared" / "data" / "timemachine.txt"
TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

# A `device` parametrisation's GPU case: marked gpu, skipped where there is no CUDA device.
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)

# Hyperparameters that train in about a second on a small generated corpus.
SMALL_TRAINING = dict(
    max_tokens=-1, val_tokens=2000, num_hiddens=16, batch_size=8, num_steps=10, num_epochs=2, eval_every=1, num_preds=10
)
# A little wider, for the tests whose registered models are served and compared.
REGISTRY_SIZE = {"num_hiddens": 32, "num_preds": 20}


def registry_config(tmp_path: Path, corpus: str | Path, **overrides):
    """A small config, a little wider (REGISTRY_SIZE), for the tests that serve and compare registered models."""
    return small_config(tmp_path, corpus, **(REGISTRY_SIZE | overrides))


def flow_config(tmp_path: Path, corpus: str | Path, **overrides):
    """A small config for the flow tests: 32 hidden units, 4 epochs, evaluated every 2."""
    return small_config(tmp_path, corpus, **({"num_hiddens": 32, "num_epochs": 4, "eval_every": 2} | overrides))


def resume_settings(tmp_path: Path, corpus: str | Path, **overrides) -> dict:
    """Config values for a few seconds of CPU training that checkpoints often (the resume and crash tests)."""
    settings = dict(
        corpus=str(corpus),
        cache_dir=str(tmp_path / "cache"),
        max_tokens=-1,
        val_tokens=1000,
        num_hiddens=24,
        batch_size=8,
        num_steps=10,
        num_epochs=6,
        eval_every=2,
        checkpoint_every=2,
        device="cpu",
    )
    return {**settings, **overrides}


def find_real_corpus() -> Path | None:
    """The Time Machine from ../shared, or from the project's download cache; None if neither is there."""
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    return next((PROJECT_ROOT / ".cache" / "corpus").glob("*-timemachine.txt"), None)


def small_text(words: int = 3000, seed: int = 0) -> str:
    """A made-up English-like text with line breaks and punctuation, reproducible by seed."""
    rng = random.Random(seed)
    vocab = "the time traveller said and it was a machine of in to that he we".split()
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(vocab))
        if len(line) == 9:
            lines.append(" ".join(line).capitalize() + rng.choice([".", ",", ";", "!"]))
            line = []
    return "\n".join(lines) + "\n"


def small_config(tmp_path: Path, corpus: str | Path, **overrides):
    """A TrainConfig for a quick real run on `corpus` (SMALL_TRAINING, then `overrides`), its cache in `tmp_path`."""
    from rnnlm.config import TrainConfig

    return TrainConfig(**(SMALL_TRAINING | {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache")} | overrides))


class QuietHandler(SimpleHTTPRequestHandler):
    """A file server's handler that keeps test output clean."""

    def log_message(self, *args) -> None:
        pass


class CountingHandler(QuietHandler):
    """A file server's handler that records every path it is asked for (in `requests_seen`)."""

    requests_seen: list[str] = []

    def do_GET(self):
        CountingHandler.requests_seen.append(self.path)
        super().do_GET()


def prefect_artifact(key: str):
    """The newest Prefect artifact under `key`, from the Prefect server the tests use."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort="CREATED_DESC", limit=1
        )
    return artifact
