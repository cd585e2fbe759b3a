"""The run, as plain functions over paths: prepare the data, fit a model, sample from it.

Each stage reads and writes files so that an orchestrator can cache, retry and log around it; nothing here knows
about Prefect or MLflow. A plain-Python run of the book's experiment is::

    from rnnlm.config import TrainConfig
    from rnnlm import experiment as ex
    cfg = TrainConfig(corpus="../shared/data/timemachine.txt")
    data = ex.prepare_data(ex.fetch(cfg), cfg)
    result = ex.fit(cfg, data, "model.pt")
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.corpus import fetch_corpus, sha1_of
from rnnlm.data import DataError, split_corpus
from rnnlm.generate import generate
from rnnlm.model import RNNLM, device_name, pick_device
from rnnlm.stream import tokenize_file
from rnnlm.train import EpochStats, TrainSettings, TrainState, make_optimizer, train
from rnnlm.vocab import Vocab

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BOOK_PROMPTS = ("time traveller", "traveller")
DATA_FIELDS = ("preprocess", "tokenization", "min_freq", "max_tokens", "val_tokens")


def cache_dir(config: TrainConfig) -> Path:
    """The download and preparation cache: `config.cache_dir`, else `<project>/.cache`."""
    return Path(config.cache_dir).expanduser().resolve() if config.cache_dir else PROJECT_ROOT / ".cache"


def fetch(config: TrainConfig) -> Path:
    """The verified local corpus file for `config` (downloaded into the cache when it is a URL)."""
    return fetch_corpus(
        config.corpus,
        cache_dir(config),
        sha1=config.expected_sha1(),
        max_bytes=int(config.max_download_mb * 2**20),
    )


@dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared corpus (vocab JSON, train and validation token arrays) and what it holds."""

    folder: str
    corpus_sha1: str
    vocab_size: int
    num_tokens: int
    train_tokens: int
    val_tokens: int
    note: str = ""

    @property
    def vocab_path(self) -> Path:
        return Path(self.folder) / "vocab.json"

    @property
    def train_path(self) -> Path:
        return Path(self.folder) / "train.npy"

    @property
    def val_path(self) -> Path:
        return Path(self.folder) / "val.npy"

    def load(self) -> tuple[Vocab, np.ndarray, np.ndarray]:
        """Vocab and the two token arrays, memory-mapped so their size does not count against the process."""
        return (
            Vocab.load(self.vocab_path),
            np.load(self.train_path, mmap_mode="r"),
            np.load(self.val_path, mmap_mode="r"),
        )


def prepared_folder(corpus_sha1: str, config: TrainConfig) -> Path:
    """Where the prepared form of a corpus goes: keyed by its content and every setting that shapes the tokens."""
    settings = {name: getattr(config, name) for name in DATA_FIELDS}
    key = hashlib.sha1(json.dumps([corpus_sha1, settings], sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(config) / "prepared" / key


def prepare_data(corpus_path: Path, config: TrainConfig) -> PreparedData:
    """Preprocess, tokenize, build the vocab and split `corpus_path` per `config`; write them to the cache.

    Raises DataError (with what to change) for a corpus that is empty after preprocessing or too short for one
    minibatch, before any training starts.
    """
    corpus_sha1 = sha1_of(corpus_path)
    folder = prepared_folder(corpus_sha1, config)
    folder.mkdir(parents=True, exist_ok=True)
    ids_path = folder / "ids.npy"  # streamed in chunks: memory does not grow with the corpus
    vocab, ids = tokenize_file(corpus_path, ids_path, config.preprocess, config.tokenization, config.min_freq)
    if not any(token.strip() for token in vocab.tokens[1:]):
        raise DataError(f"{corpus_path} holds no tokens after '{config.preprocess}' preprocessing; check the file")
    split = split_corpus(ids, config.max_tokens, config.val_tokens, config.min_corpus_tokens())
    data = PreparedData(str(folder), corpus_sha1, len(vocab), len(ids), len(split.train), len(split.val), split.note)
    _write_prepared(data, vocab, split.train, split.val)
    ids_path.unlink()
    return data


def _write_prepared(data: PreparedData, vocab: Vocab, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
    folder = Path(data.folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab.save(data.vocab_path)
    np.save(data.train_path, train_ids)
    np.save(data.val_path, val_ids)
    (folder / "info.json").write_text(json.dumps(asdict(data), indent=1))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the CPU generator that draws data offsets."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def settings_of(config: TrainConfig) -> TrainSettings:
    """The loop's hyperparameters, taken from the config by name."""
    return TrainSettings(**{name: getattr(config, name) for name in TrainSettings.__dataclass_fields__})


def fit(
    config: TrainConfig,
    data: PreparedData,
    checkpoint_path: Path,
    on_epoch: Callable[[EpochStats, TrainState], None] | None = None,
) -> dict:
    """Train a fresh model on prepared data, save a checkpoint, and return a summary of plain values."""
    vocab, train_ids, val_ids = data.load()
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model = RNNLM(len(vocab), config.num_hiddens, config.rnn, config.num_layers).to(device)
    optimizer = make_optimizer(model, config.lr)
    state = train(model, train_ids, val_ids, settings_of(config), optimizer, generator, on_epoch=on_epoch)
    last = state.history[-1]
    save_checkpoint(
        checkpoint_path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        config=config.model_dump(mode="json"),
        vocab=vocab.tokens,
        epoch=state.epoch,
        metrics=last.metrics(),
    )
    return {
        "epochs": state.epoch,
        "train_perplexity": last.train_perplexity,
        "val_perplexity": last.val_perplexity,
        "best_val_perplexity": state.best_val_perplexity,
        "tokens_per_sec": float(np.mean([s.tokens_per_sec for s in state.history])),
        "train_seconds": float(sum(s.seconds for s in state.history)),
        "device": device_name(device, config.cpu_threads),
        "history": [asdict(s) for s in state.history],
    }


def sample(checkpoint_path: Path, prompts: list[str], num_preds: int, **sampling) -> list[str]:
    """Generate from a saved checkpoint; `sampling` is passed on (temperature, top_k, seed)."""
    model, vocab, config = model_from_checkpoint(load_checkpoint(checkpoint_path))
    return generate(model, vocab, list(prompts), num_preds, config["tokenization"], **sampling)


def environment() -> dict[str, str]:
    """Versions worth recording next to a run's numbers."""
    return {"torch_version": torch.__version__, "python_version": platform.python_version()}
