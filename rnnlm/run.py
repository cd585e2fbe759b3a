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
import math
import platform
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rnnlm import paths
from rnnlm.atomic import replacing
from rnnlm.batches import DataError, as_tensor, require_training_tokens, split_corpus
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
from rnnlm.corpus import check_local, fetch_corpus, is_url, sha1_of
from rnnlm.generate import generate
from rnnlm.model import RNNLM, device_name, engine_name, matmul_precision, pick_device
from rnnlm.tokens import Vocab, split_tokens, tokenize_file
from rnnlm.train import EpochStats, Hooks, TrainState, evaluate_loss, make_optimizer, perplexity_of, train

BOOK_PROMPTS = ("time traveller", "traveller")


def cache_dir(config: TrainConfig) -> Path:
    """The download and preparation cache of this run (see `rnnlm.paths.cache_dir`)."""
    return paths.cache_dir(config.cache_dir)


def fetch(config: TrainConfig) -> Path:
    """The verified local corpus file for `config` (downloaded into the cache when it is a URL, reused from there
    when its sha1 matches or, with none expected, its size and time are the download's)."""
    return fetch_corpus(
        config.corpus,
        cache_dir(config),
        sha1=config.expected_sha1(),
        max_bytes=int(config.max_download_mb * 2**20),
        timeout=(config.download_timeout, config.download_timeout),
        deadline=config.download_deadline,
    )


def preflight(config: TrainConfig) -> None:
    """The checks that need no download and no tokenizing, for a local corpus: it is a readable file (CorpusError
    otherwise) and can hold the tokens `config` holds out (DataError naming the options otherwise). A URL's corpus is
    checked when it arrives, before any training."""
    if is_url(config.corpus):
        return
    size = check_local(config.corpus).stat().st_size
    most = size if config.tokenization == "char" else (size + 1) // 2  # a word and the space after it: 2 bytes
    held_out = config.val_tokens + config.test_tokens
    if held_out and held_out >= most:
        raise DataError(
            f"val_tokens={config.val_tokens:,} and test_tokens={config.test_tokens:,} hold out more tokens than "
            f"{config.corpus} ({size:,} bytes, at most {most:,} {config.tokenization} tokens) can have; lower "
            f"--val_tokens or --test_tokens"
        )


# --- prepared data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared corpus (vocab JSON, train, validation and test token arrays) and what it holds."""

    folder: str
    corpus_sha1: str
    vocab_size: int
    num_tokens: int
    train_tokens: int
    val_tokens: int
    note: str = ""
    test_tokens: int = 0
    reused: bool = field(default=False, compare=False)  # found in the cache, not prepared by this call

    # the files a preparation writes, info.json last
    vocab_path = property(lambda self: Path(self.folder) / "vocab.json")
    train_path = property(lambda self: Path(self.folder) / "train.npy")
    val_path = property(lambda self: Path(self.folder) / "val.npy")
    test_path = property(lambda self: Path(self.folder) / "test.npy")
    info_path = property(lambda self: Path(self.folder) / "info.json")

    def load(self) -> tuple[Vocab, np.ndarray, np.ndarray]:
        """Vocab, training and validation tokens, memory-mapped so their size does not count against the process."""
        return Vocab.load(self.vocab_path), *(np.load(p, mmap_mode="r") for p in (self.train_path, self.val_path))

    def load_test(self) -> np.ndarray:
        """The test tokens (empty without a test split), memory-mapped."""
        return np.load(self.test_path, mmap_mode="r")


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
        return _fits_vocab(cached, config)
    with replacing(folder / "ids.npy", keep=False) as ids_path:  # streamed in chunks: memory does not grow
        vocab, ids = tokenize_file(corpus_path, ids_path, config.preprocess, config.tokenization, config.min_freq)
        if not any(token.strip() for token in vocab.tokens[1:]):
            raise DataError(f"{corpus_path} holds no tokens after '{config.preprocess}' preprocessing; check the file")
        split = split_corpus(ids, config.max_tokens, config.val_tokens, config.min_corpus_tokens(), config.test_tokens)
        sizes = (len(vocab), len(ids), len(split.train), len(split.val))
        data = PreparedData(str(folder), corpus_sha1, *sizes, split.note, len(split.test))
        _write_prepared(data, vocab, split)
    return _fits_vocab(data, config)


def _fits_vocab(data: PreparedData, config: TrainConfig) -> PreparedData:
    """`data`, once the model's options fit its vocabulary (an adaptive softmax's cutoffs lie inside it); else a
    DataError saying what to change, before any training."""
    if config.adaptive_cutoffs and config.adaptive_cutoffs[-1] >= data.vocab_size:
        raise DataError(
            f"adaptive_cutoffs {config.adaptive_cutoffs} reach beyond the vocabulary of {data.vocab_size:,} tokens: "
            f"give cutoffs below {data.vocab_size:,}, or none for the full softmax"
        )
    return data


def _read_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in `folder`, if a preparation finished there (its info.json is written last)."""
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return None
    data = PreparedData(**{**info, "folder": str(folder), "reused": True})
    files = (data.vocab_path, data.train_path, data.val_path, data.test_path)
    return data if all(p.is_file() for p in files) else None


def _write_prepared(data: PreparedData, vocab: Vocab, split) -> None:
    """Each file under a temporary name, then renamed over the old one (whose readers keep it); info.json last."""
    info = {k: v for k, v in asdict(data).items() if k not in ("folder", "reused")}
    for path, write in (
        (data.vocab_path, vocab.save),
        (data.train_path, lambda tmp: np.save(tmp, split.train)),
        (data.val_path, lambda tmp: np.save(tmp, split.val)),
        (data.test_path, lambda tmp: np.save(tmp, split.test)),
        (data.info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=1))),
    ):
        with replacing(path) as tmp:
            write(tmp)


# --- training -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """What a training run gives: its last epoch's numbers (the book's figures), the registered weights' own numbers
    (the best by validation, or the last), speed, where it ran, and every epoch's stats."""

    epochs: int
    resumed_from_epoch: int
    train_perplexity: float  # the last epoch's, as the book prints it
    val_perplexity: float | None  # the last weights', on the whole validation split
    best_val_perplexity: float | None  # the best evaluation during training
    tokens_per_sec: float
    train_seconds: float
    device: str
    matmuls: str
    engine: str  # which code trained it: the CPU engine or torch's layers, and why
    history: tuple[EpochStats, ...]
    checkpoint: str  # the resumable checkpoint: the last weights
    steps: int = 0
    stopped: str = ""  # why training ended before num_epochs, if it did
    registered: str = "last"  # which weights `registered_checkpoint` holds: 'best' or 'last'
    registered_checkpoint: str = ""
    registered_epoch: int = 0
    registered_step: int = 0
    registered_val_perplexity: float | None = None  # on the whole validation split
    registered_test_perplexity: float | None = None  # None without a test split
    registered_bits_per_token: float | None = (
        None  # on the test split, else validation (bits per character at char level)
    )

    def final_metrics(self) -> dict[str, float]:
        """The numbers worth logging once at the end, without the missing ones."""
        names = (
            "train_perplexity", "val_perplexity", "best_val_perplexity", "tokens_per_sec", "train_seconds", "steps",
            "registered_epoch", "registered_step", "registered_val_perplexity", "registered_test_perplexity",
            "registered_bits_per_token",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def describe_registered(self, tokenization: str = "char") -> str:
        """One sentence on the weights this run registers: which, from where, and their held-out numbers."""
        which = "best weights by validation" if self.registered == "best" else "last weights"
        numbers = [
            f"{label} {value:.3f}"
            for label, value in (
                ("validation perplexity", self.registered_val_perplexity),
                ("test perplexity", self.registered_test_perplexity),
                (f"bits per {'character' if tokenization == 'char' else 'token'}", self.registered_bits_per_token),
            )
            if value is not None
        ]
        where = f"epoch {self.registered_epoch}, step {self.registered_step:,}"
        return f"registers the {which} ({where})" + (f": {', '.join(numbers)}" if numbers else "")


def checkpoint_folder(config: TrainConfig, corpus_sha1: str) -> Path:
    """Where resumable checkpoints of this training go: keyed by the corpus content and every field that identifies
    a training, so that the same command finds its interrupted run and any other config never does."""
    return cache_dir(config) / "checkpoints" / paths.key_of(corpus_sha1, config.identity())


def run_checkpoint(config: TrainConfig, corpus_sha1: str, run_id: str) -> Path:
    """The resumable checkpoint of one tracked run: `<checkpoint folder>/<run id>/model.pt`."""
    return checkpoint_folder(config, corpus_sha1) / run_id / "model.pt"


def best_checkpoint(checkpoint_path: Path) -> Path:
    """Where the best weights of a training go, beside its resumable checkpoint: `best.pt`."""
    return Path(checkpoint_path).with_name("best.pt")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the CPU generator that draws data offsets."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(config: TrainConfig, vocab_size: int) -> RNNLM:
    """The model `config` describes, over a vocabulary of `vocab_size` tokens."""
    return RNNLM(
        vocab_size, config.num_hiddens, config.rnn, config.num_layers, config.embedding_dim, config.dropout,
        config.tie_weights, config.adaptive_cutoffs,
    )  # fmt: skip


def fit(
    config: TrainConfig,
    data: PreparedData,
    checkpoint_path: Path,
    on_epoch: Callable[[EpochStats, TrainState], None] | None = None,
    run_id: str | None = None,
    on_resume: Callable[[TrainState], None] | None = None,
    on_start: Callable[[str, str], None] | None = None,
    on_progress: Callable[[TrainState, dict], None] | None = None,
) -> FitResult:
    """Train a model on prepared data, evaluate the weights it registers, and return what it gave.

    A resumable checkpoint goes to `checkpoint_path` every `config.checkpoint_every` epochs (and every
    `checkpoint_every_steps` steps, also inside an epoch), on Ctrl-C and at the end; the best weights by validation
    go beside it (`best_checkpoint`). If that file exists (and `config.resume` is 'auto') training continues from it
    exactly, inside an epoch too: weights, optimizer, schedule, every RNG, the carried state and the history are
    restored, `on_resume(state)` is called, and training goes on from the next minibatch. A checkpoint of another
    config or vocab raises CheckpointMismatch before any training. `on_start(device, engine)` hears where and on
    which code the training runs before it starts, `on_progress(state, values)` how a long epoch goes.
    """
    vocab, train_ids, val_ids = data.load()
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model = build_model(config, len(vocab)).to(device)
    optimizer = make_optimizer(model, config.lr, config)
    state = None
    if config.resume == "auto" and Path(checkpoint_path).is_file():
        state = resume(Path(checkpoint_path), config, vocab, model, optimizer, generator, data.corpus_sha1)
        if on_resume is not None:
            on_resume(state)
    resumed_from = state.epoch if state else 0
    common = {"config": config.model_dump(mode="json"), "vocab": vocab.tokens, "corpus_sha1": data.corpus_sha1}

    def save(current: TrainState) -> None:
        save_checkpoint(
            checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(), **common, run_id=run_id,
            **state_to_checkpoint(current), rng=rng_state(generator), data_iterator=_iterator_policy(config),
        )  # fmt: skip

    def save_best(current: TrainState) -> None:
        weights = {
            "epoch": current.best_epoch,
            "step": current.best_step,
            "val_perplexity": current.best_val_perplexity,
        }
        save_checkpoint(best_checkpoint(checkpoint_path), model=model.state_dict(), **common, **weights)

    window = (config.batch_size, config.num_steps)
    if on_start is not None:
        on_start(device_name(model, config.cpu_threads, window), engine_name(model, window))
    hooks = Hooks(on_epoch=on_epoch, on_progress=on_progress, save=save, save_best=save_best)
    state = train(model, train_ids, val_ids, config, optimizer, generator, state, hooks)
    return _result(config, data, val_ids, model, state, checkpoint_path, resumed_from, window)


def _result(
    config, data: PreparedData, val_ids, model: RNNLM, state: TrainState, checkpoint_path, resumed_from, window
):
    """FitResult from the training's state, with the last and the registered weights evaluated on the whole
    validation and test splits."""
    last_val = val = _evaluate_on(model, val_ids, config)
    registered, path, epoch, step = "last", Path(checkpoint_path), state.epoch, state.step
    best = best_checkpoint(checkpoint_path)
    if config.register_weights == "best" and best.is_file():
        saved = load_checkpoint(best, map_location=next(model.parameters()).device)
        model.load_state_dict(saved["model"])
        registered, path, epoch, step = "best", best, saved["epoch"], saved["step"]
        val = _evaluate_on(model, val_ids, config)  # the registered weights are others than the last
    test = _evaluate_on(model, data.load_test(), config)
    loss_for_bits = test if test is not None else val
    return FitResult(
        epochs=state.epoch,
        resumed_from_epoch=resumed_from,
        train_perplexity=state.history[-1].train_perplexity,
        val_perplexity=perplexity_of(last_val) if last_val is not None else None,
        best_val_perplexity=state.best_val_perplexity,
        tokens_per_sec=float(np.mean([s.tokens_per_sec for s in state.history])),
        train_seconds=float(sum(s.seconds for s in state.history)),
        device=device_name(model, config.cpu_threads, window),
        matmuls=matmul_precision(model, config.amp, window),
        engine=engine_name(model, window),
        history=tuple(state.history),
        checkpoint=str(checkpoint_path),
        steps=state.step,
        stopped=state.stopped,
        registered=registered,
        registered_checkpoint=str(path),
        registered_epoch=epoch,
        registered_step=step,
        registered_val_perplexity=perplexity_of(val) if val is not None else None,
        registered_test_perplexity=perplexity_of(test) if test is not None else None,
        registered_bits_per_token=loss_for_bits / math.log(2) if loss_for_bits is not None else None,
    )


def _evaluate_on(model: RNNLM, ids: np.ndarray, config: TrainConfig) -> float | None:
    """The mean cross-entropy of a whole held-out split (None for an empty one)."""
    if len(ids) < 2:
        return None
    tokens = as_tensor(ids, next(model.parameters()).device)
    return evaluate_loss(model, tokens, config.batch_size, config.num_steps, config.cpu_threads)


def _iterator_policy(config: TrainConfig) -> dict:
    """How the data iterator stands at a checkpoint: every epoch draws a fresh offset (and, for random sampling, a
    shuffle) from the data generator as it begins (`epoch_rng`); inside an epoch, `batch` minibatches are done."""
    kind = "random" if config.use_random_iter else "sequential"
    return {"kind": kind, "position": "epoch_rng and batch", "offset": "drawn per epoch from epoch_rng"}


_STATE_FIELDS = (
    "epoch", "step", "best_val_perplexity", "best_epoch", "best_step", "stale_evals", "lr", "elapsed", "stopped",
    "batch", "epoch_rng", "hidden", "epoch_loss", "epoch_tokens", "epoch_seconds",
)  # fmt: skip


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
    """Load `path` into the model, optimizer and RNGs after checking it belongs to this config, vocab and corpus."""
    ckpt = read_resumable(path, config, vocab, corpus_sha1, next(model.parameters()).device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"], generator)
    history = [EpochStats(**h) for h in ckpt["history"]]
    saved = {name: ckpt[name] for name in _STATE_FIELDS if name in ckpt}  # checkpoints of earlier versions: epochs only
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
    saved = {**ckpt.get("config", {}), "corpus_file_sha1": ckpt.get("corpus_sha1")}
    fields = [*config.identity(), "corpus_file_sha1"]
    check_compatible(path, {**ckpt, "config": saved}, current, vocab, fields)
    if not {"rng", "optimizer", "history"} <= ckpt.keys():
        raise CheckpointMismatch(f"{path} holds a final model, not a training state; start over with --resume never")
    return ckpt


# --- sampling -----------------------------------------------------------------------------------------------------


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


def usable_prompts(prompts: list[str], vocab: Vocab, tokenization: str) -> list[str]:
    """The prompts whose tokens are all in `vocab`; if none is, its two most frequent visible tokens, one each."""
    known = [p for p in prompts if (tokens := split_tokens(p, tokenization)) and not vocab.unknown(tokens)]
    return known or [token for token in vocab.tokens[1:] if token.strip()][:2]


def environment() -> dict[str, str]:
    """Versions worth recording next to a run's numbers."""
    return {"torch_version": torch.__version__, "python_version": platform.python_version()}
