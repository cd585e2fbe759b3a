"""Fitting, the training stage of a run: build the model, train it (resuming an interrupted training), evaluate the
weights it registers, and say what it gave as a `FitResult` that lists its own metrics and tags.

Nothing here knows about Prefect or MLflow. A plain-Python run of the book's experiment is::

    from rnnlm.config import TrainConfig
    from rnnlm import data, run
    cfg = TrainConfig(corpus="../shared/data/timemachine.txt")
    result = run.fit(cfg, data.prepare_data(data.fetch(cfg), cfg), "model.pt")
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rnnlm import averaging, cpu
from rnnlm.batches import as_tensor
from rnnlm.checkpoint import (
    best_checkpoint,
    iterator_policy,
    load_checkpoint,
    resume,
    rng_state,
    save_checkpoint,
    state_to_checkpoint,
)
from rnnlm.config import TrainConfig
from rnnlm.data import PreparedData
from rnnlm.evaluate import bits_per_byte, evaluate_loss, perplexity_of
from rnnlm.model import RNNLM, build_model, device_name, engine_name, matmul_precision, pick_device
from rnnlm.state import EpochStats, Hooks, TrainState
from rnnlm.train import make_optimizer, train


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
    # bits per byte of the held-out text (`rnnlm.evaluate.bits_per_byte`): models of one text compare whatever their
    # tokens, when their runs held out the same text (`held_out_span`)
    registered_val_bits_per_byte: float | None = None
    registered_test_bits_per_byte: float | None = None
    held_out_span: str = ""

    METRICS: ClassVar = (  # metrics(): the final numbers, without the per-epoch history
        "train_perplexity", "val_perplexity", "best_val_perplexity", "tokens_per_sec", "train_seconds", "steps",
        "registered_epoch", "registered_step", "registered_val_perplexity", "registered_test_perplexity",
        "registered_bits_per_token", "registered_val_bits_per_byte", "registered_test_bits_per_byte",
    )  # fmt: skip
    SUMMARY: ClassVar = (  # summary(): what a training flow returns about the run
        "train_perplexity", "val_perplexity", "tokens_per_sec", "device", "registered", "registered_val_perplexity",
        "registered_test_perplexity", "registered_val_bits_per_byte", "registered_test_bits_per_byte", "stopped",
        "epochs",
    )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The numbers worth logging once at the end, without the missing ones."""
        return {name: getattr(self, name) for name in self.METRICS if getattr(self, name) is not None}

    def tags(self) -> dict[str, str]:
        """Where and how it trained, as the run's tags: device, matmuls, engine, which weights it registers, and why
        it stopped early (only if it did)."""
        tags = {"device": self.device, "matmuls": self.matmuls, "engine": self.engine}
        tags["registered_weights"] = self.registered
        optional = {"held_out": self.held_out_span, "stopped": self.stopped}
        return tags | {name: value for name, value in optional.items() if value}

    def version_tags(self) -> dict[str, Any]:
        """The registered weights' own numbers (on the whole splits) and where they were taken, as a registered
        version's tags, without the missing ones; `train_perplexity` is the last epoch's, as the book prints it."""
        tags = {
            "val_perplexity": self.registered_val_perplexity,
            "test_perplexity": self.registered_test_perplexity,
            "bits_per_token": self.registered_bits_per_token,
            "val_bits_per_byte": self.registered_val_bits_per_byte,
            "test_bits_per_byte": self.registered_test_bits_per_byte,
            "held_out": self.held_out_span or None,
            "train_perplexity": self.train_perplexity,
            "weights": self.registered,
            "epoch": self.registered_epoch,
            "step": self.registered_step,
        }
        return {k: v for k, v in tags.items() if v is not None}

    def summary(self) -> dict[str, Any]:
        """What a training flow returns about the run (`SUMMARY`)."""
        return {name: getattr(self, name) for name in self.SUMMARY}

    @classmethod
    def summary_from_logged(cls, metrics: dict[str, float], tags: dict[str, str], prefix: str = "final_") -> dict:
        """`summary()` as far as a tracked run's logged `metrics()` (under `prefix`) and `tags()` give it back."""
        found = {name: metrics.get(prefix + name) for name in cls.SUMMARY if name in cls.METRICS}
        return found | {"device": tags.get("device"), "registered": tags.get("registered_weights")}

    def table(self) -> list[tuple[str, str]]:
        """(label, value) rows for a report, the registered weights named."""

        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        which = self.registered
        return [
            ("train perplexity (last epoch)", f"{self.train_perplexity:.3f}"),
            ("validation perplexity (last weights)", number(self.val_perplexity)),
            (f"validation perplexity ({which} weights, registered)", number(self.registered_val_perplexity)),
            (f"test perplexity ({which} weights)", number(self.registered_test_perplexity)),
            (f"bits per token ({which} weights)", number(self.registered_bits_per_token)),
            (f"validation bits per byte ({which} weights)", number(self.registered_val_bits_per_byte)),
            (f"test bits per byte ({which} weights)", number(self.registered_test_bits_per_byte)),
            ("held-out text", self.held_out_span or "-"),
            ("steps", f"{self.steps:,}"),
            ("tokens/s", f"{self.tokens_per_sec:,.0f}"),
            ("device", self.device),
            ("matmuls", self.matmuls),
            ("engine", self.engine),
            ("epochs", str(self.epochs)),
        ]

    def describe_registered(self, tokenization: str = "char") -> str:
        """One sentence on the weights this run registers: which, from where, and their held-out numbers."""
        which = "best weights by validation" if self.registered == "best" else "last weights"
        numbers = [
            f"{label} {value:.3f}"
            for label, value in (
                ("validation perplexity", self.registered_val_perplexity),
                ("test perplexity", self.registered_test_perplexity),
                (f"bits per {'character' if tokenization == 'char' else 'token'}", self.registered_bits_per_token),
                ("validation bits per byte", self.registered_val_bits_per_byte),
                ("test bits per byte", self.registered_test_bits_per_byte),
            )
            if value is not None
        ]
        where = f"epoch {self.registered_epoch}, step {self.registered_step:,}"
        return f"registers the {which} ({where})" + (f": {', '.join(numbers)}" if numbers else "")


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
    hooks: Hooks | None = None,
    run_id: str | None = None,
) -> FitResult:
    """Train a model on prepared data, evaluate the weights it registers, and return what it gave.

    A resumable checkpoint (tagged with `run_id`) goes to `checkpoint_path` every `config.checkpoint_every` epochs
    (and every `checkpoint_every_steps` steps, also inside an epoch), on Ctrl-C and at the end; the best weights by
    validation go beside it (`best_checkpoint`). If that file exists (and `config.resume` is 'auto') training
    continues from it exactly, inside an epoch too: weights, optimizer, schedule, every RNG, the carried state and
    the history are restored, `hooks.on_resume(state)` is called, and training goes on from the next minibatch. A
    checkpoint of another config or vocab raises CheckpointMismatch before any training. `hooks.on_start(device,
    engine)` hears where and on which code the training runs before it starts; the other hooks, how it goes.
    """
    hooks = hooks or Hooks()
    vocab, train_ids, val_ids = data.load()
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model = build_model(config, len(vocab)).to(device)
    optimizer = make_optimizer(model, config.lr, config)
    state = None
    if config.resume == "auto" and Path(checkpoint_path).is_file():
        state = resume(Path(checkpoint_path), config, vocab, model, optimizer, generator, data.corpus_sha1)
        if hooks.on_resume is not None:
            hooks.on_resume(state)
    resumed_from = state.epoch if state else 0
    common = {"config": config.model_dump(mode="json"), "vocab": vocab.tokens, "corpus_sha1": data.corpus_sha1}
    common |= {"tokenizer": vocab.tokenizer} if vocab.tokenizer is not None else {}  # BPE's, as a JSON string

    def save(current: TrainState) -> None:
        with averaging.averaged(model, current) as training:  # NT-ASGD: `model` the average, SGD's weights beside
            fields = state_to_checkpoint(current)
            if training is not None:  # the average is `model`: saved once; the weights SGD goes on from beside it
                fields |= {"average": None, "training_weights": training}
            save_checkpoint(
                checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(), **common, run_id=run_id,
                **fields, rng=rng_state(generator), data_iterator=iterator_policy(config),
            )  # fmt: skip

    def save_best(current: TrainState) -> None:
        weights = {
            "epoch": current.best_epoch,
            "step": current.best_step,
            "val_perplexity": current.best_val_perplexity,
        }
        save_checkpoint(best_checkpoint(checkpoint_path), model=model.state_dict(), **common, **weights)

    window = (config.batch_size, config.num_steps)
    if next(model.parameters()).device.type == "cpu":  # the engine's one measured choice (an LSTM's path, in the
        cpu.prepare(model, window, config.amp)  # run's precision) made here, so that the start line names what trains
    if hooks.on_start is not None:
        where = device_name(model, config.cpu_threads, window, config.amp), engine_name(model, window, config.amp)
        hooks.on_start(*where)
    hooks = dataclasses.replace(hooks, save=save, save_best=save_best)
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
    test_ids = data.load_test()
    test = _evaluate_on(model, test_ids, config)
    loss_for_bits = test if test is not None else val
    return FitResult(
        epochs=state.epoch,
        resumed_from_epoch=resumed_from,
        train_perplexity=state.history[-1].train_perplexity,
        val_perplexity=perplexity_of(last_val) if last_val is not None else None,
        best_val_perplexity=state.best_val_perplexity,
        tokens_per_sec=float(np.mean([s.tokens_per_sec for s in state.history])),
        train_seconds=float(sum(s.seconds for s in state.history)),
        device=device_name(model, config.cpu_threads, window, config.amp),
        matmuls=matmul_precision(model, config.amp, window),
        engine=engine_name(model, window, config.amp),
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
        registered_val_bits_per_byte=_bits_per_byte(val, len(val_ids), data, "val"),
        registered_test_bits_per_byte=_bits_per_byte(test, len(test_ids), data, "test"),
        held_out_span=data.held_out_span,
    )


def _bits_per_byte(mean_loss: float | None, num_tokens: int, data: PreparedData, split: str) -> float | None:
    """Bits per byte of a held-out split, from its mean loss (None without one, or without its bytes)."""
    if mean_loss is None:
        return None
    held = data.held_out_bytes(split)
    return bits_per_byte(mean_loss, num_tokens, held.num_bytes, held.unk_bytes)


def _evaluate_on(model: RNNLM, ids: np.ndarray, config: TrainConfig) -> float | None:
    """The mean cross-entropy of a whole held-out split (None for an empty one)."""
    if len(ids) < 2:
        return None
    tokens = as_tensor(ids, next(model.parameters()).device)
    return evaluate_loss(model, tokens, config.batch_size, config.num_steps, config.cpu_threads)
