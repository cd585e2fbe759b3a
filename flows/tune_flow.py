"""Search for the best recipe for a corpus and a time budget: `python flows/tune_flow.py --help`.

Optuna's TPE draws configurations from a space file (recipes/spaces/real-text.toml); each trial is a real training
for `--trial_minutes`, its evaluations fed to a median pruner; survivors train again for eta times longer
(asynchronous successive halving) up to the final budget, until `--max_minutes` of search are spent; then the best
configuration is written as a recipe and trained by the training flow for the final budget and registered. The study
is in a database (SQLite beside the MLflow store, or `--storage`), so the same command resumes a killed search.
Trials run one at a time here, or in parallel on a Dask cluster (`--dask_address`). See docs/tuning.md.
"""

# No `from __future__ import annotations` here: Prefect builds the parameter form from these annotations.
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.cli import parse_command, run_command
from flows.train_flow import train_flow
from rnnlm import paths
from rnnlm.config import RecipeError, TrainConfig, read_recipe
from rnnlm.data import preflight
from rnnlm.search import Budgets, SearchSpace, SpaceError, read_space
from tasks.mlflow_run import check_tracking
from tasks.tune import report_study, start_study_run, train_trial
from tracking import study as studies
from tracking.runs import TrackedRun, run_guard
from tracking.study import STOPPING

DEFAULT_SPACE = "recipes/spaces/real-text.toml"


class TuneConfig(BaseModel):
    """A search: the base recipe, the space, the budgets, where the study is kept and where trials run."""

    model_config = ConfigDict(populate_by_name=True)

    # named `recipe` here (the command line's --config_file): flows/cli.py reads a `config_file` as this command's
    # own options, where it holds the trainings'
    recipe: str | None = Field(
        None, alias="config_file", description="The base recipe (TOML or YAML); the space's fields vary on it."
    )
    corpus: str | None = Field(None, description="The corpus to tune for (overrides the recipe's).")
    space: str = Field(DEFAULT_SPACE, description="The search space file (see docs/tuning.md).")
    max_minutes: float = Field(60.0, gt=0, description="Minutes of search (trials); the final training comes after.")
    trial_minutes: float = Field(
        0.0, ge=0, description="Training minutes of a new trial (the lowest rung); 0: the final budget over eta (rungs "
        "3.3 and 10 minutes for a 10-minute final training).",
    )  # fmt: skip
    final_minutes: float = Field(
        0.0, ge=0, description="Minutes of the final training of the best (and the top rung); 0: the recipe's "
        "max_minutes, else 10.",
    )  # fmt: skip
    eta: int = Field(3, ge=2, description="Successive halving: a rung's best 1/eta train again eta times longer.")
    n_trials: int = Field(0, ge=0, description="Stop after this many trials ended (complete or pruned); 0: no limit.")
    storage: str | None = Field(None, description="The study's database URL (default: sqlite beside the MLflow store).")
    study_name: str | None = Field(None, description="The study's name (default: from the corpus, recipe and space).")
    recipe_out: str | None = Field(None, description="Where the best recipe goes (default: mlruns/tuned/<study>.toml).")
    dask_address: str | None = Field(None, description="A Dask scheduler (tcp://host:8786) to run trials on.")
    parallel: int = Field(0, ge=0, description="Trials at once; 0: one here, the workers' number on Dask.")
    seed: int = Field(0, ge=0, description="The sampler's seed.")
    base_trial: bool = Field(
        True, description="First train the base recipe at the final budget: the yardstick the best must beat (it "
        "stays the best when no configuration does).",
    )  # fmt: skip
    promote: bool = Field(False, description="After the final training, move 'champion' if it beats it.")
    promote_margin: float = Field(0.0, ge=0, lt=1, description="Fraction by which it must beat the champion.")

    def base(self) -> TrainConfig:
        """The base configuration: the recipe, with the corpus given."""
        options = read_recipe(self.recipe) if self.recipe else {}
        return TrainConfig(**options | ({"corpus": self.corpus} if self.corpus else {}))

    def budgets(self) -> Budgets:
        recipe_minutes = self.base().max_minutes
        final = self.final_minutes or recipe_minutes or 10.0
        trial = self.trial_minutes or final / self.eta
        return Budgets(trial, max(final, trial), self.eta)

    def space_path(self) -> Path:
        """The space file, from the working directory or else from the project."""
        path = Path(self.space)
        return path if path.exists() or path.is_absolute() else paths.home() / path

    def name(self) -> str:
        """The study's name: given, or one the same command always gives (so that it resumes)."""
        if self.study_name:
            return self.study_name
        base = self.base()
        key = paths.key_of(
            base.identity(), base.corpus, self.space_path().read_text(), self.budgets().__dict__, length=8
        )
        return f"tune-{Path(base.corpus).stem}-{key}"


@flow(name="tune-rnnlm", flow_run_name="tune-{tune.max_minutes}min")
def tune_flow(tune: TuneConfig) -> dict:
    """Search, write the best recipe, train it for the final budget and register it; returns what it found."""
    base, space, budgets, name = tune.base(), read_space(tune.space_path()), tune.budgets(), tune.name()
    space.check(base)  # as the command line does before it starts the flow: for callers from Python
    check_tracking(base)
    url = tune.storage or studies.default_storage()
    with studies.driving(name, url):
        study = studies.open_study(name, url, tune.seed)
        settings = {"study": name, "storage": url, "space": str(tune.space_path()), "measure": space.measure}
        settings |= budgets.__dict__
        settings |= {"max_minutes_search": tune.max_minutes, "runner": tune.dask_address or "here"}
        parent = start_study_run(study, base, settings, str(tune.space_path()))
        with run_guard(TrackedRun(parent)):
            if stale := studies.release_stale(study):
                print(f"trials {stale} were left running by a stopped search: queued again")
            if tune.base_trial and (said := studies.enqueue_base(study, space, base, budgets)):
                print(said)
            _search(tune, study, space, base, budgets, url, parent)
            best = studies.best(study)
            if best is None:
                raise RuntimeError(f"no trial of {name!r} completed: see the trials' runs under MLflow run {parent}")
            recipe = (read_recipe(tune.recipe) if tune.recipe else {}) | {"max_minutes": budgets.final_minutes}
            recipe_path = tune.recipe_out or str(studies.store_folder() / "tuned" / f"{name}.toml")
            found = report_study(study, best.number, space, base, recipe, recipe_path, parent)
            final = study.user_attrs.get("final") or _final_training(tune, study, base, found, budgets, parent)
    print(f"{found['verdict']}; recipe {recipe_path}")
    return {"study": name, "recipe": recipe_path, **found, "final": final}


def _search(tune, study, space: SearchSpace, base: TrainConfig, budgets: Budgets, url: str, parent: str) -> None:
    """Run trials (`parallel` at once) until the search's minutes, or `n_trials`, are spent; a stopped search's
    minutes count (kept in the study). Stopped (Ctrl-C), it tells the trials in this process to stop too."""
    STOPPING.clear()
    try:
        _trials(tune, study, space, base, budgets, url, parent)
    except BaseException:
        STOPPING.set()
        raise


def _trials(tune, study, space: SearchSpace, base: TrainConfig, budgets: Budgets, url: str, parent: str) -> None:
    started, before = time.monotonic(), study.user_attrs.get("search_seconds", 0.0)
    parallel = _parallel(tune)
    running, failures = {}, []
    while True:
        while len(running) < parallel and _more(tune, study, budgets, before + time.monotonic() - started, running):
            trial, rung, config = studies.ask(study, space, base, budgets)
            # the worker reopens the trial by its storage id (Optuna's Trial(study, trial_id) takes no number)
            resume = trial.user_attrs.get(studies.RESUME_RUN)  # a trial run again continues the stopped one's run
            args = (study.study_name, url, trial._trial_id, trial.number, rung, config, parent, space.measure, resume)
            future = train_trial.submit(*args)
            running[future] = trial
        if not running:
            return
        future = next(as_completed(list(running)))
        outcome = _outcome(future)
        studies.tell(study, running.pop(future), outcome)
        study.set_user_attr("search_seconds", before + time.monotonic() - started)
        failures = failures + [outcome["reason"]] if outcome["state"] == "FAIL" else []
        if len(failures) >= 3:
            raise RuntimeError(f"{len(failures)} trials in a row failed; the last: {failures[-1]}")


def _more(tune: TuneConfig, study, budgets: Budgets, spent: float, running: dict) -> bool:
    """Whether another trial starts: the trials asked for are not all there, and its budget fits in what is left."""
    if tune.n_trials and studies.finished(study) + len(running) >= tune.n_trials:
        return False
    return spent + 60 * budgets.minutes(studies.peek(study, budgets).rung) <= 60 * tune.max_minutes


def _outcome(future) -> dict:
    """A trial's outcome, or FAIL with the reason when its task raised."""
    try:
        return future.result()
    except Exception as err:
        return {"state": "FAIL", "reason": f"{type(err).__name__}: {err}"[:500]}


def _final_training(tune: TuneConfig, study, base: TrainConfig, found: dict, budgets: Budgets, parent: str) -> dict:
    """The best configuration trained by the training flow for the final budget, registered (and promoted)."""
    config = TrainConfig(**base.model_dump() | found["values"])
    config = config.model_copy(update={"max_minutes": budgets.final_minutes, "promote": tune.promote,
                                       "promote_margin": tune.promote_margin})  # fmt: skip
    result = train_flow(config, parent_run_id=parent)
    final = {"run_id": result["run_id"], "version": result["version"]}
    study.set_user_attr("final", final)
    return final


def _parallel(tune: TuneConfig) -> int:
    """Trials at once: as asked, else one here or one per Dask worker."""
    if tune.parallel or not tune.dask_address:
        return tune.parallel or 1
    from distributed import Client

    with Client(tune.dask_address, timeout=60) as client:
        return max(1, len(client.scheduler_info()["workers"]))


def task_runner(tune: TuneConfig):
    """Local threads, or the Dask cluster at `tune.dask_address`."""
    if tune.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=tune.dask_address)
    return ThreadPoolTaskRunner(max_workers=max(tune.parallel, 1))


def check(tune: TuneConfig) -> None:
    """Everything that can be refused before the search starts: the recipe, the space (every range end, choice and
    a sample of combinations against TrainConfig), the corpus. Raises SpaceError or RecipeError naming the field."""
    base = tune.base()
    read_space(tune.space_path()).check(base)
    budgets = tune.budgets()
    if budgets.trial_minutes > tune.max_minutes:
        raise SpaceError(f"--trial_minutes ({tune.trial_minutes:g}) is more than the search's --max_minutes")
    preflight(base)


def run_tune(tune: TuneConfig) -> dict:
    """Run the search on the task runner it asks for."""
    return tune_flow.with_options(task_runner=task_runner(tune))(tune)


class TuneCommand(BaseSettings, TuneConfig):
    """The command line: `--config_file recipes/kjv-best.toml --corpus my.txt --max_minutes 60 ...`."""

    model_config = SettingsConfigDict(
        env_prefix="RNNLM_TUNE_", cli_prog_name="python flows/tune_flow.py", cli_implicit_flags=True, extra="forbid"
    )


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, refuse a bad recipe or space with one `error:` line, then search."""
    command = parse_command(TuneCommand, argv, engine=True)
    tune = TuneConfig(**command.model_dump(include=set(TuneConfig.model_fields)))
    try:
        check(tune)
    except ValidationError as err:  # TrainConfig refusing the recipe's values
        problem = err.errors()[0]
        sys.exit(f"error: --config_file: {'.'.join(map(str, problem['loc']))}: {problem['msg']}")
    except (SpaceError, RecipeError) as err:
        sys.exit(f"error: {err}")
    except ValueError as err:  # a corpus that cannot serve the recipe (CorpusError, DataError)
        sys.exit(f"error: {err}")
    return run_command(lambda: run_tune(tune))


if __name__ == "__main__":
    from flows.cli import run_script

    # this module as `flows.tune_flow`, not as the script's `__main__`: on Dask each trial travels with its flow run's
    # context, and a flow found by its module's name is pickled by reference (`__main__`'s by value, with STOPPING's
    # lock: the command failed with "Could not serialize object of type LLGExpr")
    from flows.tune_flow import main as importable_main

    run_script(importable_main)
