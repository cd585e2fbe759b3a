"""The Optuna study of a search: where it is stored, which trial runs next (`rnnlm.search.next_job`), what each
trial gave, the trials a killed search left running, and what a trial reports while it trains (`TrialPruning`, the
training's hooks that feed the pruner).

The study lives in a real database (SQLite beside the MLflow store by default, any SQLAlchemy URL such as
PostgreSQL for a team), so a search killed by `kill -9` or Ctrl-C resumes from it: the process that drives a study
holds a lock (`driving`) while it runs, so a trial found RUNNING by the next driver was left by a dead one; it is
marked FAIL and its configuration queued again, at the same rung; the trial run again continues the stopped one's MLflow
run from its last checkpoint (an hour-long trial stopped at minute 50 does not start over).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from filelock import FileLock, Timeout
from optuna.trial import TrialState

from rnnlm import paths
from rnnlm.config import TrainConfig
from rnnlm.data import PreparedData
from rnnlm.evaluate import bits_per_byte
from rnnlm.search import Budgets, Job, SearchSpace, SpaceError, StepReports, TrialRecord, best_trial, next_job
from rnnlm.state import EpochStats, Hooks, TrainState
from tracking import store

RUNG, PROMOTED_FROM, RETRY_OF, BASE = "rung", "promoted_from", "retry_of", "base_recipe"
# A trial's MLflow run, and for a trial run again after its search stopped, the stopped trial's run it continues
RUN_ID, RESUME_RUN = "run_id", "resume_run"

# Set by the search when it stops (Ctrl-C, an error): the trials training in this process stop at their next epoch
# or progress line instead of training on to the end of their budget for nobody.
STOPPING = threading.Event()


class SearchStopped(RuntimeError):
    """The search that started this trial has stopped."""


class StudyBusy(RuntimeError):
    """Another process drives this study now."""


def store_folder() -> Path:
    """The folder of the MLflow SQLite store (`<home>/mlruns` when MLflow is a server), created."""
    uri = store.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else paths.mlruns()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def default_storage() -> str:
    """SQLite beside the MLflow store: `<folder of mlflow.db>/optuna.db`."""
    return f"sqlite:///{store_folder() / 'optuna.db'}"


def make_pruner() -> optuna.pruners.BasePruner:
    """The median rule at each tenth of a new trial's budget (steps from `rnnlm.search.report_step`, so only trials
    of the same rung meet): once two trials have finished, a trial whose best evaluation is worse than theirs at the
    same step stops. Trials promoted to a higher rung are not pruned (`TrialPruning`)."""
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, n_min_trials=2)


def storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database; SQLite waits up to a minute for a writer instead of failing at once."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def open_study(name: str, url: str, seed: int = 0) -> optuna.Study:
    """The study `name` in `url`, created on first use: TPE (with a constant liar for the trials in flight), the
    median pruner, perplexity minimised."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines would repeat the tasks' own
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.create_study(
        study_name=name, storage=storage(url), sampler=sampler, pruner=make_pruner(), direction="minimize",
        load_if_exists=True,
    )  # fmt: skip


def load_study(name: str, url: str) -> optuna.Study:
    """The study as a worker opens it to report a trial's evaluations (with the same pruner)."""
    return optuna.load_study(study_name=name, storage=storage(url), pruner=make_pruner())


@contextmanager
def driving(name: str, url: str) -> Iterator[None]:
    """Hold the study's lock while this process drives it; StudyBusy if another process does."""
    lock = FileLock(store_folder() / f".optuna-{paths.key_of(url, name)}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudyBusy(f"another process is running the search {name!r} ({url}); wait for it or stop it") from None
    try:
        yield
    finally:
        lock.release()


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial as the budget rule sees it."""
    return [
        TrialRecord(t.number, t.user_attrs.get(RUNG, 0), t.state.name, t.value, t.user_attrs.get(PROMOTED_FROM))
        for t in study.get_trials(deepcopy=False)
    ]


def release_stale(study: optuna.Study) -> list[int]:
    """Mark the trials a dead driver left RUNNING as FAIL and queue their configurations again (same rung and
    origin, and the stopped trial's run to continue from its checkpoint); returns their numbers. Only for the
    process that holds `driving`."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        attrs = {k: v for k, v in trial.user_attrs.items() if k in (RUNG, PROMOTED_FROM, BASE)}
        attrs |= {RESUME_RUN: trial.user_attrs[RUN_ID]} if RUN_ID in trial.user_attrs else {}
        study.enqueue_trial(trial.params, user_attrs=attrs | {RETRY_OF: trial.number})
    return [t.number for t in stale]


def ask(study: optuna.Study, space: SearchSpace, base: TrainConfig, budgets: Budgets):
    """The next trial (a queued one first, else `next_job`'s), its rung and its full configuration with the rung's
    time budget."""
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        job = next_job(records(study), budgets)
        if job.promote is not None:
            attrs = {RUNG: job.rung, PROMOTED_FROM: job.promote}
            study.enqueue_trial(study.trials[job.promote].params, user_attrs=attrs)
    trial = study.ask()
    rung = trial.user_attrs.get(RUNG, 0)
    trial.set_user_attr(RUNG, rung)
    config = space.config(base, space.draw(trial, base))
    return trial, rung, config.model_copy(update={"max_minutes": budgets.minutes(rung)})


def peek(study: optuna.Study, budgets: Budgets) -> Job:
    """The rung of the trial `ask` would start next."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return Job(waiting[0].user_attrs.get(RUNG, 0)) if waiting else next_job(records(study), budgets)


def tell(study: optuna.Study, trial: optuna.Trial, outcome: dict) -> None:
    """Record what a trial gave (`outcome` from the train-trial task): complete with its value, pruned, or failed."""
    for key in ("epochs", "reason"):  # the run id is the trial's from its start (`train_trial`)
        if outcome.get(key) is not None:
            trial.set_user_attr(key, outcome[key])
    state = TrialState[outcome["state"]]
    value = outcome.get("value")
    if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
        state = TrialState.FAIL  # a finished training without a finite validation perplexity gives nothing to rank
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


def finished(study: optuna.Study) -> int:
    """How many trials ended with a result (complete or pruned)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def enqueue_base(study: optuna.Study, space: SearchSpace, base: TrainConfig, budgets: Budgets) -> str:
    """Queue the base recipe as the study's first trial, at the top rung (the final budget): the yardstick the
    search's configurations must beat where the best is chosen. Only in a study with no trials yet; returns what
    was done, in words."""
    if study.trials:
        return ""
    try:
        params = space.base_params(base)
    except SpaceError as err:
        return f"no base trial: {err}"
    study.enqueue_trial(params, user_attrs={RUNG: budgets.top(), BASE: True})
    return f"trial 0 is the base recipe at the final budget ({budgets.final_minutes:g} min)"


def base_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The base recipe's trial, when it completed."""
    done = [t for t in study.trials if t.user_attrs.get(BASE) and t.state == TrialState.COMPLETE]
    return done[0] if done else None


def best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial of the highest rung that has one (`rnnlm.search.best_trial`)."""
    found = best_trial(records(study))
    return None if found is None else study.trials[found.number]


# --- what a trial reports while it trains ---------------------------------------------------------------------


class TrialPruning:
    """Hooks that report each evaluation to the trial (at `rnnlm.search.report_step`) and stop the training, by
    raising optuna.TrialPruned, when the pruner says so or the perplexity is not finite."""

    def __init__(self, trial: optuna.Trial, rung: int, config: TrainConfig, measure: Callable[[float], float] = float):
        """`measure` turns an evaluation's validation perplexity into what ranks the study's trials."""
        self.trial, self.config, self.reports, self.measure = trial, config, StepReports(rung), measure
        self.last: float | None = None

    def on_epoch(self, stats: EpochStats, state: TrainState) -> None:
        _stop_if_stopping()
        if stats.val_perplexity is not None:
            self._report(
                max(stats.epoch / self.config.num_epochs, self._time_done(state.elapsed)), stats.val_perplexity
            )

    def on_progress(self, state: TrainState, values: dict) -> None:
        _stop_if_stopping()
        if values.get("val_perplexity") is not None and values["val_perplexity"] != self.last:
            self._report(values["run_done"], values["val_perplexity"])

    def _time_done(self, seconds: float) -> float:
        return seconds / (60 * self.config.max_minutes) if self.config.max_minutes else 0.0

    def _report(self, done: float, perplexity: float) -> None:
        self.last = perplexity
        value = self.measure(perplexity)
        step = self.reports.add(done, value)
        if step is None:
            return
        self.trial.report(value, step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"validation perplexity {perplexity} at step {step}")
        if self.reports.rung == 0 and self.trial.should_prune():  # a promoted trial earned its rung: it runs out
            raise optuna.TrialPruned(f"validation perplexity {perplexity:.2f} at step {step}: worse than the median")


def measure_of(name: str, data: PreparedData) -> Callable[[float], float]:
    """How a validation perplexity during training becomes the study's measure: itself, or for 'bits_per_byte' the
    bits per byte of the validation text at its tokens per byte (the evaluations read a part of it: an estimate
    good enough to prune by; a trial's final value is measured on the whole text)."""
    if name == "perplexity":
        return float
    return lambda perplexity: bits_per_byte(math.log(perplexity), data.val_tokens, data.val_bytes) or math.inf


def _stop_if_stopping() -> None:
    if STOPPING.is_set():
        raise SearchStopped("the search stopped; this trial is run again when it resumes")


def both(first: Hooks, second: TrialPruning) -> Hooks:
    """The training's reports (`first`) followed by the pruner's."""

    def chained(a, b):
        return b if a is None else (lambda *args: (a(*args), b(*args)))

    return Hooks(
        on_epoch=chained(first.on_epoch, second.on_epoch),
        on_progress=chained(first.on_progress, second.on_progress),
        on_start=first.on_start,
        on_resume=first.on_resume,
    )
