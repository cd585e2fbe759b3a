"""A search space over TrainConfig fields, read from a file, and the budget rule of a search (successive halving).

A space file (TOML, or YAML for .yaml/.yml) has one table per searched field::

    [lr]
    low = 0.0003
    high = 0.01
    log = true            # sampled on a log scale

    [num_hiddens]
    choices = [128, 256, 512]

    [embedding_dim]
    same_as = "num_hiddens"    # not searched: takes the value of another field

    [tie_weights]
    choices = [true, false]
    when = "embedding_dim == num_hiddens"   # searched only then; otherwise the base recipe's value

A range takes `low`, `high`, and optionally `log` or `step`; a field of any type takes `choices`. `when` is a
condition (or a list of them, all needed) `<field> <op> <field or TOML value>`, with op one of == != < <= > >=, on
fields searched earlier in the file or set by the base recipe. `read_space` refuses an unknown field or key and a
bad range; `SearchSpace.check` refuses, before a search starts, any value or combination TrainConfig refuses.

Nothing here imports Optuna: a search draws values through a `Picker`, which an Optuna trial is.
"""

from __future__ import annotations

import json
import math
import operator
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from rnnlm.config import TrainConfig

KEYS = {"low", "high", "log", "step", "choices", "when", "same_as"}
OPERATORS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CONDITION = re.compile(r"^\s*(\w+)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*$")
# fields a search must not move: where a run's data and results go, and how it is told to stop or register
NOT_SEARCHABLE = {"corpus", "corpus_sha1", "cache_dir", "experiment", "registered_model", "max_minutes", "resume"}
# fields that change what the validation figures are measured on (the text itself, which of it is held out, which
# words are <unk>): trials that differ in them would be ranked by numbers that do not compare
NOT_COMPARABLE = {"preprocess", "min_freq", "max_tokens", "held_out", "val_tokens", "test_tokens"}
# fields that change what a token is: a space that searches one ranks its trials by validation bits per byte, on the
# same held-out text for every trial (held_out bytes or lines), as the registry ranks models of one text
BY_BYTES = {"tokenization", "bpe_vocab_size"}
# what ranks a search's trials, and its name in tables and reports
MEASURES = {
    "perplexity": ("val_ppl", "validation perplexity"),
    "bits_per_byte": ("val_bpb", "validation bits per byte"),
}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the field and what is wrong."""


class Picker(Protocol):
    """What draws the values: an Optuna trial (`suggest_*`), or `RandomPicker` for the checks."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_categorical(self, name: str, choices: list) -> Any: ...


@dataclass(frozen=True)
class Condition:
    """`field op other`: `other` is another field's name or a value."""

    field: str
    op: str
    other: Any
    other_is_field: bool

    def holds(self, values: dict) -> bool:
        right = values[self.other] if self.other_is_field else self.other
        return OPERATORS[self.op](values[self.field], right)

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.other if self.other_is_field else json.dumps(self.other)}"


@dataclass(frozen=True)
class Param:
    """One searched field: a range (`low`, `high`, `log`, `step`), `choices`, or `same_as` another field."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[Condition, ...] = ()
    same_as: str | None = None

    def extremes(self) -> list:
        """The values worth checking before a search: the ends of a range, or every choice."""
        return list(self.choices) if self.choices else [] if self.same_as else [self.low, self.high]

    def draw(self, picker: Picker) -> Any:
        """This field's value, drawn by `picker` (choices that are not plain values travel as JSON)."""
        if self.choices:
            encoded = [_encode(c) for c in self.choices]
            return _decode(picker.suggest_categorical(self.name, encoded), self.choices)
        if _is_int(self.name):
            return picker.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return picker.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """The searched fields, in the file's order (a condition refers only to fields before it)."""

    params: tuple[Param, ...]
    source: str = "the search space"

    def draw(self, picker: Picker, base: TrainConfig) -> dict:
        """The searched fields' values for one trial (a field whose condition fails keeps the base's value)."""
        values, chosen = base.model_dump(), {}
        for param in self.params:
            if param.same_as:
                values[param.name] = chosen[param.name] = values[param.same_as]
            elif all(c.holds(values) for c in param.when):
                values[param.name] = chosen[param.name] = param.draw(picker)
        return chosen

    @property
    def measure(self) -> str:
        """What ranks the trials: 'perplexity', or 'bits_per_byte' where a searched field changes what a token is."""
        return "bits_per_byte" if any(p.name in BY_BYTES for p in self.params) else "perplexity"

    def check(self, base: TrainConfig, draws: int = 64, seed: int = 0) -> None:
        """Refuse, before a search starts, a space where TrainConfig refuses some value or combination: every end
        of every range and every choice (with the other fields drawn at random), then `draws` random trials; and a
        search of what a token is over text held out in tokens (each trial would hold out different text)."""
        if self.measure == "bits_per_byte" and base.held_out == "tokens":
            name = next(p.name for p in self.params if p.name in BY_BYTES)
            raise SpaceError(
                f"{self.source}: {name}: trials that differ in what a token is are ranked by validation bits per "
                'byte of the same held-out text: set held_out = "bytes" (or "lines") in the base recipe, with '
                "val_tokens and test_tokens in that unit"
            )
        rng = random.Random(seed)
        for param in self.params:
            for value in param.extremes():
                self._try(base, RandomPicker(rng, {param.name: value}), param.name)
        for _ in range(draws):
            self._try(base, RandomPicker(rng), None)

    def _try(self, base: TrainConfig, picker: RandomPicker, fixed: str | None) -> None:
        chosen = self.draw(picker, base)
        try:
            TrainConfig(**{**base.model_dump(), **chosen})
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(map(str, problem["loc"])) or fixed or ", ".join(chosen)
            message = problem["msg"].removeprefix("Value error, ")
            raise SpaceError(
                f"{self.source}: {where}: {message} (with {', '.join(f'{k}={v!r}' for k, v in chosen.items())})"
            ) from None

    def base_params(self, base: TrainConfig) -> dict:
        """The base recipe's values of the searched fields as a trial's params; SpaceError, naming them, where some
        lie outside the space."""
        picker = BasePicker(base)
        self.draw(picker, base)
        if picker.outside:
            raise SpaceError(f"{self.source}: the base recipe's {', '.join(picker.outside)} outside the space")
        return picker.params

    def config(self, base: TrainConfig, chosen: dict) -> TrainConfig:
        """The base configuration with a trial's values."""
        return TrainConfig(**{**base.model_dump(), **chosen})


class RandomPicker:
    """Draws uniformly (or log-uniformly) at random, except for the fields given fixed values."""

    def __init__(self, rng: random.Random, fixed: dict | None = None):
        self.rng, self.fixed = rng, fixed or {}

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        if name in self.fixed:
            return self.fixed[name]
        if log:
            return min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high))))))
        return low + step * self.rng.randint(0, (high - low) // step)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False):
        if name in self.fixed:
            return self.fixed[name]
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return _encode(self.fixed[name]) if name in self.fixed else self.rng.choice(choices)


class BasePicker:
    """Picks the base recipe's own values, as Optuna's params (what `study.enqueue_trial` takes), and says which
    one lies outside the space (`outside`), where the base recipe cannot be one of the search's trials."""

    def __init__(self, base: TrainConfig):
        self.values, self.params, self.outside = base.model_dump(), {}, []

    def _take(self, name: str, value: Any, inside: bool) -> Any:
        if not inside:
            self.outside.append(f"{name}={self.values[name]!r}")
        self.params[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._take(name, self.values[name], low <= self.values[name] <= high)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False):
        return self._take(name, self.values[name], low <= self.values[name] <= high)

    def suggest_categorical(self, name: str, choices: list) -> Any:
        encoded = _encode(self.values[name])
        return self._take(name, encoded, encoded in choices)


def read_space(path: str | Path) -> SearchSpace:
    """The search space in a TOML or YAML file; refuses (SpaceError, naming the field) an unknown field or key, a
    field that must not be searched, a bad range and a condition on a field not known by then."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            tables = yaml.safe_load(text) or {}
        else:
            tables = tomllib.loads(text)
    except Exception as err:  # OSError, UnicodeDecodeError, TOMLDecodeError, YAMLError: each says what and where
        raise SpaceError(f"cannot read the search space {path}: {err}") from err
    if not isinstance(tables, dict) or not tables:
        raise SpaceError(f"{path} must hold one table per searched field, e.g. [lr] low = 0.001 high = 0.1")
    known = set(TrainConfig.model_fields)  # every field has a value (the base's) before the search draws any
    params = [_param(path, name, spec, known) for name, spec in tables.items()]
    searched = [p.name for p in params]
    for i, param in enumerate(params):
        later = [c for c in param.when if c.field in searched[i:] or (c.other_is_field and c.other in searched[i:])]
        if later:
            raise SpaceError(f"{path}: {param.name}: its condition '{later[0]}' names a field searched after it")
        if param.same_as in searched[i:]:
            raise SpaceError(f"{path}: {param.name}: same_as names {param.same_as}, which is searched after it")
    return SearchSpace(tuple(params), str(path))


def _param(path: Path, name: str, spec: Any, known: set[str]) -> Param:
    """One table of the file, checked."""

    def refuse(message: str) -> SpaceError:
        return SpaceError(f"{path}: {name}: {message}")

    if name not in known:
        raise refuse("no such option (see python flows/train_flow.py --help)")
    if name in NOT_SEARCHABLE:
        raise refuse("is not searched (it says where data and results go or how the tuner runs trials)")
    if name in NOT_COMPARABLE:
        raise refuse(
            "changes the text the validation figures are measured on, so trials would not compare: run one search "
            "per value instead (set it in the base recipe)"
        )
    if not isinstance(spec, dict):
        raise refuse("give a table: low/high (log, step), choices, or same_as")
    if unknown := sorted(set(spec) - KEYS):
        raise refuse(f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    when = spec.get("when", [])
    conditions = tuple(_condition(refuse, text, known) for text in ([when] if isinstance(when, str) else when))
    if "same_as" in spec:
        if spec["same_as"] not in known or set(spec) - {"same_as", "when"}:
            raise refuse("same_as takes the name of another option, alone")
        return Param(name, same_as=spec["same_as"], when=conditions)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or set(spec) - {"choices", "when"}:
            raise refuse("choices must be a non-empty list, without low/high/log/step")
        return Param(name, choices=tuple(choices), when=conditions)
    return _range(refuse, name, spec, conditions)


def _range(refuse, name: str, spec: dict, conditions: tuple) -> Param:
    if "low" not in spec or "high" not in spec:
        raise refuse("a range needs low and high (or give choices)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    kind = TrainConfig.model_fields[name].annotation
    if kind not in (int, float):
        raise refuse(f"is not a number ({kind}): give choices")
    numbers = [v for v in (low, high, step) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers):
        raise refuse(f"low, high and step must be numbers (now {low!r}, {high!r}, {step!r})")
    if kind is int and any(not float(v).is_integer() for v in numbers):
        raise refuse(f"is a whole number: low, high and step must be too (now {low!r}, {high!r}, {step!r})")
    if not low < high:
        raise refuse(f"a bad range: low ({low}) must be below high ({high})")
    if not isinstance(log, bool) or (log and low <= 0):
        raise refuse(f"log must be true or false, and a log range must start above 0 (now low = {low})")
    if step is not None and (log or step <= 0 or step > high - low):
        raise refuse(f"step ({step}) must be positive, at most high - low, and without log")
    return Param(name, low=low, high=high, log=log, step=step, when=conditions)


def _condition(refuse, text: Any, known: set[str]) -> Condition:
    match = _CONDITION.match(text) if isinstance(text, str) else None
    if match is None or match.group(1) not in known:
        raise refuse(f"when = {text!r}: write '<option> <op> <option or value>' with op one of {', '.join(OPERATORS)}")
    left, op, right = match.groups()
    if right in known:
        return Condition(left, op, right, True)
    try:
        value = tomllib.loads(f"v = {right}")["v"]
    except tomllib.TOMLDecodeError:
        raise refuse(f"when = {text!r}: {right!r} is neither an option nor a TOML value") from None
    return Condition(left, op, value, False)


def _is_int(name: str) -> bool:
    return TrainConfig.model_fields[name].annotation is int


def _encode(value: Any) -> Any:
    """A choice as Optuna stores it: plain values as they are, others (lists) as JSON text."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def _decode(encoded: Any, choices: tuple) -> Any:
    return next((c for c in choices if _encode(c) == encoded), encoded)


# --- budgets: successive halving over training minutes ----------------------------------------------------------


@dataclass(frozen=True)
class Budgets:
    """Rung r trains for `trial_minutes * eta**r` minutes, the top rung for `final_minutes` (the final training's
    budget); a rung keeps its best 1/eta, which go on to the next rung."""

    trial_minutes: float
    final_minutes: float
    eta: int = 3

    def top(self) -> int:
        """The highest rung: the first whose budget reaches the final one (0 when trials already do)."""
        rung = 0
        while self.trial_minutes * self.eta**rung < self.final_minutes:
            rung += 1
        return rung

    def minutes(self, rung: int) -> float:
        return min(self.trial_minutes * self.eta**rung, self.final_minutes) if rung else self.trial_minutes


@dataclass(frozen=True)
class TrialRecord:
    """What the budget rule needs to know of a trial."""

    number: int
    rung: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None = None
    promoted_from: int | None = None


@dataclass(frozen=True)
class Job:
    """The next trial to run: a new configuration at rung 0, or a finished trial's again at a higher rung."""

    rung: int
    promote: int | None = None  # the number of the trial whose configuration goes up


def next_job(trials: list[TrialRecord], budgets: Budgets) -> Job:
    """Asynchronous successive halving: promote the best not yet promoted trial among a rung's top 1/eta (the
    highest rung first), else start a new configuration at rung 0."""
    promoted = {t.promoted_from for t in trials if t.promoted_from is not None}
    for rung in range(budgets.top() - 1, -1, -1):
        done = sorted((t for t in trials if t.rung == rung and t.state == "COMPLETE"), key=lambda t: t.value)
        for candidate in done[: len(done) // budgets.eta]:
            if candidate.number not in promoted:
                return Job(rung + 1, candidate.number)
    return Job(0)


def best_trial(trials: list[TrialRecord]) -> TrialRecord | None:
    """The best complete trial of the highest rung that has one: what won at the longest budget."""
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    top = max(t.rung for t in done)
    return min((t for t in done if t.rung == top), key=lambda t: t.value)


def report_step(rung: int, done: float) -> int:
    """The step a trial reports an evaluation at: its rung and the tenth of its budget done (0-9), so that a pruner
    compares trials only at the same rung and the same point of their budgets."""
    return 100 * rung + min(int(10 * done), 9)


@dataclass
class StepReports:
    """The evaluations a trial has reported, one per step (the first in each tenth of its budget)."""

    rung: int
    reported: dict[int, float] = field(default_factory=dict)

    def add(self, done: float, value: float) -> int | None:
        """The step to report `value` at, or None when this step has its value already."""
        step = report_step(self.rung, done)
        if step in self.reported:
            return None
        self.reported[step] = value
        return step


def to_toml(options: dict, comment: str = "") -> str:
    """Options as a recipe file (`name = value` lines), None values left out."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for name, value in options.items():
        if value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} in a recipe")
