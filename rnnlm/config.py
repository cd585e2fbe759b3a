"""The one typed configuration of a training run.

`TrainConfig` is the single source of truth: the flow's parameters (and so the Prefect UI form), the command line
(`flows/train_flow.py --help`), the MLflow params and the checkpoint's `config` all come from it. Its defaults are the
book's experiment (D2L 8.6): The Time Machine, characters, 10,000 tokens, batch 32, 35 steps, `nn.RNN` with 256
hidden units, SGD lr 1, clipping at norm 1, 500 epochs, sequential partitioning.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TIME_MACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

# Checksums of corpora whose URL we know, so that the default run is verified without the user giving a sha1.
KNOWN_SHA1 = {TIME_MACHINE_URL: TIME_MACHINE_SHA1}

# Upper bounds that stop a typo (an extra zero or three) before it allocates gigabytes.
MAX_HIDDENS = 16_384
MAX_LAYERS = 16
MAX_BATCH = 65_536
MAX_STEPS = 10_000


# What a field is to a run, declared with it (`data_field`, `run_field`, plain `Field`) and read by `fields_with_role`:
# "data" shapes the prepared tokens (and so what is trained); "run" says where things come from and go, or how often
# to report, and never changes the trained weights, so a run may resume with other values; every other field (and
# any new one) is "training": with the corpus's content and the data fields, it identifies a training.
DATA, RUN = {"role": "data"}, {"role": "run"}


def data_field(default, description: str, **constraints):
    """A field that shapes the prepared tokens."""
    return Field(default, description=description, json_schema_extra=DATA, **constraints)


def rate_field(description: str):
    """A probability of dropping something in training: 0 (off, the default) up to below 1."""
    return Field(0.0, ge=0, lt=1, description=description)


def run_field(default, description: str, **constraints):
    """A field that never changes the trained weights."""
    return Field(default, description=description, json_schema_extra=RUN, **constraints)


# Options that were renamed: old name -> new name. The old names are still accepted (recipes, checkpoints, the
# parameters of deployments made before); the command line says once that they were renamed. `register` became
# `register_weights` because a field named `register` shadows ABCMeta's `register` on the model class.
RENAMED = {"register": "register_weights"}


class TrainConfig(BaseModel):
    """Everything that defines a training run; defaults reproduce D2L section 8.6."""

    # no inf or nan in any float field: none of them means anything by it (0 is "no limit" where there is one)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- data -------------------------------------------------------------------------------------------------
    corpus: str = run_field(TIME_MACHINE_URL, "Corpus to train on: an http(s):// or file:// URL, or a local path.")
    corpus_sha1: str | None = run_field(
        None, "Expected sha1 of the corpus file; checked before use. Known for the default URL."
    )
    cache_dir: str | None = run_field(
        None,
        "Folder for downloaded corpora, prepared data and checkpoints (default: $RNNLM_CACHE_DIR, else .cache in "
        "the project's folder).",
    )
    max_download_mb: float = run_field(1024.0, "Refuse downloads larger than this many megabytes.", gt=0)
    download_timeout: float = run_field(
        30.0, "Seconds to wait for the corpus server to connect or send the next bytes.", gt=0, le=3600
    )
    download_deadline: float = run_field(
        3600.0,
        "Seconds a whole download may take, however steadily the bytes come (checked between reads).",
        gt=0,
        le=7 * 86400,
    )
    preprocess: Literal["book", "words", "raw"] = data_field(
        "book",
        "'book': every run of non-letters becomes one space, lowercased (D2L); 'words': lowercased, punctuation "
        "split off as tokens (real text at word level); 'raw': keep text as is.",
    )
    tokenization: Literal["char", "word", "bpe"] = data_field(
        "char",
        "Token level: characters, words, or 'bpe': byte-level BPE subwords (any script, no <unk>; bpe_vocab_size "
        "of them, learned from the training text only; needs held_out bytes or lines).",
    )
    bpe_vocab_size: int = data_field(
        2000, "With tokenization 'bpe': how many subword tokens (<unk>, the 256 bytes, then merges).", ge=258,
        le=1_000_000,
    )  # fmt: skip
    held_out: Literal["tokens", "bytes", "lines"] = data_field(
        "tokens",
        "The unit of val_tokens and test_tokens: 'tokens' of the prepared text (the book), or 'bytes' / 'lines' of "
        "the corpus file, cut at a line boundary, so that runs of one corpus with any tokenization hold out the "
        "same text (their bits per byte compare).",
    )
    min_freq: int = data_field(0, "Tokens seen fewer times than this map to <unk>.", ge=0)
    max_tokens: int = data_field(
        10_000, "Training tokens taken from the start of the corpus (D2L uses 10,000); -1 for all not held out."
    )
    val_tokens: int = data_field(
        10_000, "Validation tokens held out from the tail of the corpus, never seen in training; 0 for none.", ge=0
    )
    test_tokens: int = data_field(
        0,
        "Test tokens held out after the validation tokens, at the very end of the corpus; 0 for none (the book).",
        ge=0,
    )

    # --- model ------------------------------------------------------------------------------------------------
    rnn: Literal["rnn", "gru", "lstm"] = Field("rnn", description="Recurrent layer: nn.RNN, nn.GRU or nn.LSTM.")
    num_hiddens: int = Field(256, gt=0, le=MAX_HIDDENS, description="Hidden units per recurrent layer.")
    num_layers: int = Field(1, gt=0, le=MAX_LAYERS, description="Stacked recurrent layers.")
    embedding_dim: int = Field(
        0, ge=0, le=MAX_HIDDENS, description="Size of a learned input embedding; 0 for the book's one-hot inputs."
    )
    dropout: float = rate_field("Dropout on the embedding, between layers and before the output layer (training only).")
    tie_weights: bool = Field(
        False, description="Share the embedding with the output layer (needs embedding_dim == num_hiddens)."
    )
    adaptive_cutoffs: list[int] = Field(
        [],
        description="An adaptive softmax for large vocabularies, e.g. 2000,6000: the words ranked below the first "
        "cutoff in its head, rarer ones in smaller clusters (quicker to train); empty: the full softmax (the book).",
    )
    adaptive_div_value: float = Field(
        4.0,
        ge=1.0,
        le=64.0,
        description="With adaptive_cutoffs: each tail cluster scores its words from a projection of the hidden state "
        "this many times narrower than the one before (Grave et al.'s 4); lower gives rare words more room.",
    )
    # AWD-LSTM's regularisers (Merity et al. 2017), all off by default; the CPU engine and torch's layers apply them
    weight_drop: float = rate_field(
        "DropConnect on every layer's hidden-to-hidden weights: one mask per minibatch (training only)."
    )
    embed_dropout: float = rate_field("Drop whole words (the same word everywhere in a minibatch) from the inputs.")
    locked_dropout: bool = Field(
        False,
        description="The dropout on the embedding, between layers and before the output layer with one mask per "
        "sequence, the same at every time step (variational); needs dropout above 0.",
    )

    # --- training ---------------------------------------------------------------------------------------------
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Sequences per minibatch.")
    num_steps: int = Field(35, gt=0, le=MAX_STEPS, description="Time steps per sequence (truncated BPTT length).")
    lr: float = Field(1.0, gt=0, description="Learning rate (its peak, with a schedule).")
    optimizer: Literal["sgd", "adamw", "ntasgd"] = Field(
        "sgd",
        description="'sgd': the book's plain SGD; 'adamw': AdamW; 'ntasgd': SGD, then averaged weights (evaluated, "
        "kept and registered) once validation has not improved for asgd_patience evaluations.",
    )
    asgd_patience: int = Field(
        5, gt=0, description="With the ntasgd optimizer, evaluations without improvement before averaging starts."
    )
    ar_alpha: float = Field(
        0.0, ge=0, description="Activation regularisation: alpha * mean square of the last layer's dropped outputs."
    )
    tar_beta: float = Field(
        0.0, ge=0, description="Temporal activation regularisation: beta * mean square of the last layer's steps."
    )
    variable_steps: bool = Field(
        False,
        description="AWD-LSTM's random window lengths around num_steps (sequential batches), the rate scaled by "
        "each window's length / num_steps.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (L2 for SGD, decoupled for AdamW).")
    mask_unseen: bool = Field(
        False,
        description="No gradient for the output weights of tokens absent from the training text (in the vocabulary "
        "from held-out text): AdamW would push them down a full step every minibatch, and held-out text that uses "
        "them pays for it.",
    )
    lr_schedule: Literal["constant", "plateau", "cosine"] = Field(
        "constant",
        description="'constant' (the book); 'plateau': divide by lr_decay after an evaluation that does not improve "
        "on the best validation perplexity; 'cosine': warmup_steps up, then down to lr_min by the end.",
    )
    lr_decay: float = Field(4.0, gt=1, description="With the plateau schedule, what the rate is divided by.")
    warmup_steps: int = Field(0, ge=0, description="With the cosine schedule, steps of linear warmup first.")
    lr_min: float = Field(0.0, ge=0, description="With the cosine schedule, the rate it ends at.")
    early_stopping: int = Field(
        0, ge=0, description="Stop after this many evaluations without a better validation perplexity; 0: never."
    )
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value (D2L's theta).")
    num_epochs: int = Field(500, gt=0, le=1_000_000, description="Passes over the training tokens.")
    use_random_iter: bool = Field(
        False,
        description="Random sampling (state reset every batch) instead of sequential partitioning (state carried).",
    )
    seed: int = Field(0, ge=0, description="Seed for weights, data offsets and sampling; CPU runs repeat exactly.")
    device: Literal["auto", "cpu", "cuda", "mps"] = run_field(
        "auto", "Where to train: 'auto' picks CUDA, then Apple MPS, then CPU."
    )
    # evaluations steer the plateau schedule and early stopping: when and on what they run is part of a training
    eval_every: int = Field(10, gt=0, description="Log progress and validation perplexity every this many epochs.")
    eval_every_steps: int = Field(
        0, ge=0, description="Evaluate every this many steps (minibatches), also inside an epoch; 0: by epochs."
    )
    val_max_tokens: int = Field(
        0, ge=0, description="Validation tokens the evaluations during training use (the final ones use all); 0: all."
    )
    progress_every: int = run_field(
        200, "Inside epochs longer than this many steps, a progress line (tokens/s, ETA) every this many.", gt=0
    )
    max_minutes: float = Field(
        0.0, ge=0, description="Stop training after this many minutes (then evaluate and register); 0: no limit."
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="Torch threads when training on the CPU; 0 (auto): one when the compiled recurrences serve the "
        "model (they take a second core for themselves), else torch's default, all cores.",
    )
    amp: bool = Field(
        False,
        description="bf16 matmuls, weights and SGD in float32: autocast of the forward pass on GPUs; on CPUs with "
        "AVX512-BF16 the LSTM's recurrent matmuls and its whole SGD step in compiled code (or torch's bf16 LSTM "
        "where that measures quicker, as on Xeons with AMX), or an adaptive softmax's matmuls (the engine's "
        "recurrence stays float32); float32 on other CPUs, where bf16 would be slower.",
    )
    checkpoint_every: int = run_field(
        10, "Write a resumable checkpoint every this many epochs (and always at the end).", gt=0
    )
    checkpoint_every_steps: int = run_field(
        0, "Write a resumable checkpoint every this many steps, also inside an epoch; 0: by epochs only.", ge=0
    )
    resume: Literal["auto", "never"] = run_field(
        "auto",
        "'auto': continue an interrupted run of the same config from its last checkpoint; 'never': always start over.",
    )

    # --- outputs ----------------------------------------------------------------------------------------------
    num_preds: int = run_field(50, "Tokens generated after each prompt in the samples.", ge=0, le=10_000)
    experiment: str = run_field("rnnlm", "MLflow experiment name.", min_length=1)
    registered_model: str = run_field("rnnlm", "MLflow registered model name.", min_length=1)
    register_weights: Literal["best", "last"] = run_field(
        "best",
        "Which weights to register: 'best' by validation perplexity (kept as training goes), or 'last' (formerly "
        "`register`, still accepted).",
    )

    # --- registry (after registration) ------------------------------------------------------------------------
    promote: bool = run_field(
        False,
        "After registering, move the 'champion' alias to the best version on the same data if it "
        "beats the champion by more than promote_margin, and 'challenger' to the newest version.",
    )
    promote_margin: float = run_field(
        0.0, "Fraction by which a version must beat the champion (0 = any improvement).", ge=0, lt=1
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, values):
        """Options under their former names (see RENAMED) count as the new ones; both at once must agree."""
        if not isinstance(values, dict) or not RENAMED.keys() & values.keys():
            return values
        values = dict(values)
        for old, new in RENAMED.items():
            if old in values:
                value = values.pop(old)
                if new in values and values[new] != value:
                    raise ValueError(f"{old} is the former name of {new}: give only {new}")
                values[new] = value
        return values

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info: ValidationInfo):
        """A number field refuses true/false (pydantic would take them as 1/0): `num_hiddens: true` is a mistake."""
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            if cls.model_fields[info.field_name].annotation in (int, float, list[int]):
                raise ValueError(f"{info.field_name} takes numbers, not true or false")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_positive_or_all(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("max_tokens must be a positive number of tokens, or -1 for the whole corpus")
        return value

    @field_validator("corpus_sha1")
    @classmethod
    def _sha1_is_hex(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 40 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError("corpus_sha1 must be 40 hexadecimal characters (the output of `sha1sum FILE`)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _options_fit_together(self) -> TrainConfig:
        if self.tie_weights and self.embedding_dim != self.num_hiddens:
            raise ValueError(
                f"tie_weights needs embedding_dim == num_hiddens (now {self.embedding_dim} and {self.num_hiddens}): "
                f"set --embedding_dim {self.num_hiddens}, or leave tie_weights off"
            )
        cutoffs = self.adaptive_cutoffs
        if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1):
            raise ValueError(
                f"adaptive_cutoffs must be word ranks rising strictly from 1 or more (now {cutoffs}), e.g. 2000,6000"
            )
        self._regularisers_fit()
        if self.early_stopping and not self.val_tokens:
            raise ValueError("early_stopping counts evaluations on validation tokens: set --val_tokens above 0")
        if self.lr_schedule == "plateau" and not self.val_tokens:
            raise ValueError("the plateau schedule follows the validation perplexity: set --val_tokens above 0")
        if self.register_weights == "best" and not self.val_tokens:
            self.__dict__["register_weights"] = "last"  # no validation, no best: the last weights are what there is
        return self

    def _regularisers_fit(self) -> None:
        """ValueError where a regulariser is asked for where it cannot act."""
        if self.locked_dropout and not self.dropout:
            raise ValueError("locked_dropout shares dropout's masks across time steps: set --dropout above 0")
        if self.variable_steps and self.use_random_iter:
            raise ValueError("variable_steps varies the windows of sequential batches: leave use_random_iter off")
        if self.optimizer == "ntasgd" and not self.val_tokens:
            raise ValueError("the ntasgd optimizer starts averaging when validation stalls: set --val_tokens above 0")

    @model_validator(mode="after")
    def _bpe_holds_out_text(self) -> TrainConfig:
        if self.tokenization == "bpe" and self.held_out == "tokens" and (self.val_tokens or self.test_tokens):
            raise ValueError(
                "tokenization bpe learns its tokens from the training text, so the held-out text is given in the "
                "corpus's bytes or lines: add --held_out bytes (or lines), e.g. --held_out bytes --val_tokens 100000"
            )
        return self

    @model_validator(mode="after")
    def _corpus_scheme(self) -> TrainConfig:
        scheme = self.corpus.split("://", 1)[0].lower() if "://" in self.corpus else ""
        if scheme not in ("", "http", "https", "file"):
            raise ValueError(
                f"corpus {self.corpus!r} uses the scheme {scheme!r}; give an http://, https:// or file:// URL "
                "or a local path"
            )
        return self

    @classmethod
    def from_recipe(cls, path: str | Path, **overrides) -> TrainConfig:
        """The config a recipe file gives (see `read_recipe`), with `overrides` on top."""
        return cls(**{**read_recipe(path), **overrides})

    @classmethod
    def fields_with_role(cls, *roles: str) -> list[str]:
        """The names of the fields whose role (see DATA, RUN) is one of `roles`; 'training' is the default role."""
        return [
            name
            for name, field in cls.model_fields.items()
            if (field.json_schema_extra or {}).get("role", "training") in roles
        ]

    def identity(self) -> dict:
        """The fields that define what is trained (every role but 'run'), by name."""
        return {name: getattr(self, name) for name in self.fields_with_role("data", "training")}

    def expected_sha1(self) -> str | None:
        """The checksum the corpus must have: the one given, else the known one for the default URL."""
        return self.corpus_sha1 or KNOWN_SHA1.get(self.corpus)

    def evaluates(self) -> bool:
        """Whether training measures validation perplexity at all."""
        return self.val_tokens > 0

    def min_corpus_tokens(self) -> int:
        """Fewest training tokens that give one minibatch under either partitioning (and any random offset)."""
        return self.batch_size * self.num_steps + self.num_steps + 1


class RecipeError(ValueError):
    """A recipe file that cannot be read or names options that do not exist; the message says which."""


def read_recipe(path: str | Path) -> dict:
    """A recipe: TrainConfig options from a TOML file (`key = value` lines, see recipes/), or a YAML one (.yaml,
    .yml). Unknown options are refused by name, before anything runs; values are checked by TrainConfig."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read the recipe {path}: {err}") from err
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            options = yaml.safe_load(text) or {}
        else:
            options = tomllib.loads(text)
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: both say where
        raise RecipeError(
            f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'TOML'}: {err}"
        ) from err
    if not isinstance(options, dict):
        raise RecipeError(f"{path} must hold options as `name = value` pairs, not a {type(options).__name__}")
    if odd := [key for key in options if not isinstance(key, str)]:  # YAML reads `1:` and `null:` as non-strings
        raise RecipeError(f"{path} has keys that are not option names: {', '.join(map(repr, odd))}")
    known = {*TrainConfig.model_fields, *RENAMED}
    if unknown := sorted(set(options) - known):
        raise RecipeError(
            f"{path} names options that do not exist: {', '.join(unknown)} (see python flows/train_flow.py --help)"
        )
    return options
