"""One run as plain functions over files: fetch the corpus, prepare the data, fit a model, sample from it.

Each stage reads and writes files and returns a typed value, so that an orchestrator can retry and log around it;
nothing here knows about Prefect or MLflow. A plain-Python run of the book's experiment is::

    from rnnlm.config import TrainConfig
    from rnnlm import run
    cfg = TrainConfig(corpus="../shared/data/timemachine.txt")
    data = run.prepare_data(run.fetch(cfg), cfg)
    result = run.fit(cfg, data, "model.pt")
"""

from __future__ import annotations

import json
import platform
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rnnlm import paths
from rnnlm.atomic import replacing
from rnnlm.batches import DataError, require_training_tokens, split_corpus
from rnnlm.checkpoint import (
    CheckpointMismatch,
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from rnnlm.config import TrainConfig
from rnnlm.corpus import fetch_corpus, sha1_of
from rnnlm.generate import generate
from rnnlm.model import RNNLM, device_name, engine_name, matmul_precision, pick_device
from rnnlm.tokens import Vocab, tokenize_file
from rnnlm.train import EpochStats, TrainState, make_optimizer, train

BOOK_PROMPTS = ("time traveller", "traveller")


def cache_dir(config: TrainConfig) -> Path:
    """The download and preparation cache of this run (see `rnnlm.paths.cache_dir`)."""
    return paths.cache_dir(config.cache_dir)


def fetch(config: TrainConfig) -> Path:
    """The verified local corpus file for `config` (downloaded into the cache when it is a URL, reused from there
    when its sha1 matches or none is expected)."""
    return fetch_corpus(
        config.corpus,
        cache_dir(config),
        sha1=config.expected_sha1(),
        max_bytes=int(config.max_download_mb * 2**20),
        timeout=(config.download_timeout, config.download_timeout),
    )


# --- prepared data ------------------------------------------------------------------------------------------------


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
    reused: bool = field(default=False, compare=False)  # found in the cache, not prepared by this call

    # the files a preparation writes, info.json last
    vocab_path = property(lambda self: Path(self.folder) / "vocab.json")
    train_path = property(lambda self: Path(self.folder) / "train.npy")
    val_path = property(lambda self: Path(self.folder) / "val.npy")
    info_path = property(lambda self: Path(self.folder) / "info.json")

    def load(self) -> tuple[Vocab, np.ndarray, np.ndarray]:
        """Vocab and the two token arrays, memory-mapped so their size does not count against the process."""
        return (
            Vocab.load(self.vocab_path),
            np.load(self.train_path, mmap_mode="r"),
            np.load(self.val_path, mmap_mode="r"),
        )


def prepared_folder(corpus_sha1: str, config: TrainConfig) -> Path:
    """Where the prepared form of a corpus goes: keyed by its content and every setting that shapes the tokens."""
    settings = {name: getattr(config, name) for name in TrainConfig.fields_with_role("data")}
    return cache_dir(config) / "prepared" / paths.key_of(corpus_sha1, settings)


def prepare_data(corpus_path: Path, config: TrainConfig) -> PreparedData:
    """Preprocess, tokenize, build the vocab and split `corpus_path` per `config`, into the cache; a corpus prepared
    with the same settings before is read back from there.

    Raises DataError (with what to change) for a corpus that is empty after preprocessing or too short for one
    minibatch, before any training starts. Runs that prepare the same corpus at once (a sweep's members) each work
    in their own temporary files and rename the results into place, so that none reads another's half-written file
    and a run that has the previous arrays memory-mapped keeps them whole.
    """
    corpus_sha1 = sha1_of(corpus_path)
    folder = prepared_folder(corpus_sha1, config)
    if (cached := _read_prepared(folder)) is not None:
        require_training_tokens(cached.train_tokens, config.min_corpus_tokens())  # batch and steps may differ
        return cached
    with replacing(folder / "ids.npy", keep=False) as ids_path:  # streamed in chunks: memory does not grow
        vocab, ids = tokenize_file(corpus_path, ids_path, config.preprocess, config.tokenization, config.min_freq)
        if not any(token.strip() for token in vocab.tokens[1:]):
            raise DataError(f"{corpus_path} holds no tokens after '{config.preprocess}' preprocessing; check the file")
        split = split_corpus(ids, config.max_tokens, config.val_tokens, config.min_corpus_tokens())
        data = PreparedData(
            str(folder), corpus_sha1, len(vocab), len(ids), len(split.train), len(split.val), split.note
        )
        _write_prepared(data, vocab, split.train, split.val)
    return data


def _read_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in `folder`, if a preparation finished there (its info.json is written last)."""
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return None
    data = PreparedData(**{**info, "folder": str(folder), "reused": True})
    return data if all(p.is_file() for p in (data.vocab_path, data.train_path, data.val_path)) else None


def _write_prepared(data: PreparedData, vocab: Vocab, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
    """Each file under a temporary name, then renamed over the old one (whose readers keep it); info.json last."""
    info = {k: v for k, v in asdict(data).items() if k not in ("folder", "reused")}
    for path, write in (
        (data.vocab_path, vocab.save),
        (data.train_path, lambda tmp: np.save(tmp, train_ids)),
        (data.val_path, lambda tmp: np.save(tmp, val_ids)),
        (data.info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=1))),
    ):
        with replacing(path) as tmp:
            write(tmp)


# --- training -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """What a training run gives: its last epoch's numbers, speed, where it ran, and every epoch's stats."""

    epochs: int
    resumed_from_epoch: int
    train_perplexity: float
    val_perplexity: float | None
    best_val_perplexity: float | None
    tokens_per_sec: float
    train_seconds: float
    device: str
    matmuls: str
    engine: str  # which code trained it: the CPU engine's kernels or torch's layers, and why
    history: tuple[EpochStats, ...]
    checkpoint: str

    def final_metrics(self) -> dict[str, float]:
        """The numbers worth logging once at the end, without the missing ones."""
        names = ("train_perplexity", "val_perplexity", "best_val_perplexity", "tokens_per_sec", "train_seconds")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def checkpoint_folder(config: TrainConfig, corpus_sha1: str) -> Path:
    """Where resumable checkpoints of this training go: keyed by the corpus content and every field that identifies
    a training, so that the same command finds its interrupted run and any other config never does."""
    return cache_dir(config) / "checkpoints" / paths.key_of(corpus_sha1, config.identity())


def run_checkpoint(config: TrainConfig, corpus_sha1: str, run_id: str) -> Path:
    """The resumable checkpoint of one tracked run: `<checkpoint folder>/<run id>/model.pt`."""
    return checkpoint_folder(config, corpus_sha1) / run_id / "model.pt"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the CPU generator that draws data offsets."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    config: TrainConfig,
    data: PreparedData,
    checkpoint_path: Path,
    on_epoch: Callable[[EpochStats, TrainState], None] | None = None,
    run_id: str | None = None,
    on_resume: Callable[[TrainState], None] | None = None,
    on_start: Callable[[str, str], None] | None = None,
) -> FitResult:
    """Train a model on prepared data and return what it gave.

    A resumable checkpoint goes to `checkpoint_path` every `config.checkpoint_every` epochs, on Ctrl-C and at the
    end. If that file exists (and `config.resume` is 'auto') training continues from it exactly: weights, optimizer,
    every RNG and the history are restored, `on_resume(state)` is called, and the first epoch run is the next one.
    A checkpoint of another config or vocab raises CheckpointMismatch before any training. `on_start(device,
    engine)` hears where and on which code the training runs before it starts.
    """
    vocab, train_ids, val_ids = data.load()
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model = RNNLM(len(vocab), config.num_hiddens, config.rnn, config.num_layers).to(device)
    optimizer = make_optimizer(model, config.lr)
    state = None
    if config.resume == "auto" and Path(checkpoint_path).is_file():
        state = resume(Path(checkpoint_path), config, vocab, model, optimizer, generator, data.corpus_sha1)
        if on_resume is not None:
            on_resume(state)
    resumed_from = state.epoch if state else 0

    def save(current: TrainState) -> None:
        save_checkpoint(
            checkpoint_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            config=config.model_dump(mode="json"),
            vocab=vocab.tokens,
            corpus_sha1=data.corpus_sha1,
            run_id=run_id,
            **state_to_checkpoint(current),
            rng=rng_state(generator),
            data_iterator=_iterator_policy(config),
        )

    window = (config.batch_size, config.num_steps)
    if on_start is not None:
        on_start(device_name(model, config.cpu_threads, window), engine_name(model, window))
    state = train(model, train_ids, val_ids, config, optimizer, generator, state, on_epoch, save)
    last = state.history[-1]
    return FitResult(
        epochs=state.epoch,
        resumed_from_epoch=resumed_from,
        train_perplexity=last.train_perplexity,
        val_perplexity=last.val_perplexity,
        best_val_perplexity=state.best_val_perplexity,
        tokens_per_sec=float(np.mean([s.tokens_per_sec for s in state.history])),
        train_seconds=float(sum(s.seconds for s in state.history)),
        device=device_name(model, config.cpu_threads, window),
        matmuls=matmul_precision(model, config.amp, window),
        engine=engine_name(model, window),
        history=tuple(state.history),
        checkpoint=str(checkpoint_path),
    )


def _iterator_policy(config: TrainConfig) -> dict:
    """How the data iterator stands at a checkpoint: checkpoints fall between epochs, and every epoch draws a fresh
    offset (and, for random sampling, a shuffle) from the data generator, whose state is saved with them."""
    kind = "random" if config.use_random_iter else "sequential"
    return {"kind": kind, "position": "epoch boundary", "offset": "drawn per epoch from rng['data']"}


def state_to_checkpoint(state: TrainState) -> dict:
    """The loop's state as plain data: epoch, best validation perplexity, per-epoch history, last metrics."""
    return {
        "epoch": state.epoch,
        "best_val_perplexity": state.best_val_perplexity,
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
    """Load `path` into the model, optimizer and RNGs after checking it belongs to this config, vocab and corpus."""
    ckpt = read_resumable(path, config, vocab, corpus_sha1, next(model.parameters()).device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"], generator)
    history = [EpochStats(**h) for h in ckpt["history"]]
    return TrainState(epoch=ckpt["epoch"], history=history, best_val_perplexity=ckpt["best_val_perplexity"])


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
    saved = {**ckpt.get("config", {}), "corpus_file_sha1": ckpt.get("corpus_sha1")}
    fields = [*config.identity(), "corpus_file_sha1"]
    check_compatible(path, {**ckpt, "config": saved}, current, vocab, fields)
    if not {"rng", "optimizer", "history"} <= ckpt.keys():
        raise CheckpointMismatch(f"{path} holds a final model, not a training state; start over with --resume never")
    return ckpt


# --- sampling -----------------------------------------------------------------------------------------------------


def sample_many(checkpoint_path: Path, prompts: list[str], num_preds: int, settings: dict[str, dict]) -> dict:
    """Generate from a saved checkpoint (loaded once) under several named sampling settings: name -> texts."""
    model, vocab, config = model_from_checkpoint(load_checkpoint(checkpoint_path))
    return {
        name: generate(model, vocab, list(prompts), num_preds, config["tokenization"], **options)
        for name, options in settings.items()
    }


def environment() -> dict[str, str]:
    """Versions worth recording next to a run's numbers."""
    return {"torch_version": torch.__version__, "python_version": platform.python_version()}
