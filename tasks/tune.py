"""Search tasks: the study's parent MLflow run, one trial (a real training, reporting its evaluations to the pruner),
and the study's report: the trials' table, the pictures, the best configuration as a recipe."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import optuna
from mlflow.entities import Metric
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm import data as rnnlm_data
from rnnlm.checkpoint import run_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.run import fit
from rnnlm.search import MEASURES, SearchSpace, to_toml
from rnnlm.train import TrainingDiverged
from tracking import store
from tracking import study_report as report
from tracking.progress import TrainingProgress
from tracking.runs import TRIAL_TAG, TrackedRun, new_run, resume_trial, run_guard
from tracking.study import RUN_ID, RUNG, TrialPruning, both, load_study, measure_of

PARENT_ATTR = "mlflow_parent_run_id"


@task(name="start-study-run", task_run_name="start-study-run", cache_policy=NO_CACHE)
def start_study_run(study: optuna.Study, base: TrainConfig, settings: dict, space_file: str) -> str:
    """The study's parent MLflow run, which every trial's run and the final training nest under: the one this
    study started before (reopened when a search resumes), else a new one with the search's settings as params."""
    mlflow_client, logger = store.client(), get_run_logger()
    if run_id := study.user_attrs.get(PARENT_ATTR):
        mlflow_client.update_run(run_id, status="RUNNING")
        logger.warning("resuming the search %r: %d trials stored; MLflow run %s", study.study_name,
                       len(study.trials), run_id)  # fmt: skip
        return run_id
    tags = store.run_tags() | {"mlflow.source.name": "flows/tune_flow.py", "tune.study": study.study_name}
    run = mlflow_client.create_run(store.experiment_id(base.experiment), run_name=study.study_name, tags=tags)
    params = settings | {f"base.{k}": v for k, v in base.model_dump(mode="json").items()}
    mlflow_client.log_batch(run.info.run_id, params=[store.as_param(k, v) for k, v in params.items()])
    mlflow_client.log_artifact(run.info.run_id, space_file)
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    logger.info("search %r, MLflow parent run %s", study.study_name, run.info.run_id)
    return run.info.run_id


@task(name="train-trial", task_run_name="trial-{number}-rung-{rung}", cache_policy=NO_CACHE)
def train_trial(
    study_name: str,
    storage_url: str,
    trial_id: int,
    number: int,
    rung: int,
    config: TrainConfig,
    parent_run_id: str,
    measure: str = "perplexity",
    resume_run: str | None = None,
) -> dict:
    """One trial: a real training of `config` (`rnnlm.run.fit`, its budget in `config.max_minutes`) in its own
    MLflow run nested under the study's, its evaluations reported to the study's pruner; returns its state
    (COMPLETE, PRUNED), the registered weights' validation `measure` (perplexity or bits_per_byte), the run id and
    why it stopped. A trial run again after its search stopped (`resume_run`: the stopped trial's run) continues
    that run from its last checkpoint when it left one."""
    trial = optuna.trial.Trial(load_study(study_name, storage_url), trial_id)
    logger = get_run_logger()
    prepared = rnnlm_data.prepare_data(rnnlm_data.fetch(config), config)
    mlflow_client = store.client()
    tracked = resume_trial(config, prepared, resume_run, parent_run_id) if resume_run else None
    if tracked is None:
        run_id = new_run(mlflow_client, config, prepared, parent_run_id)
        tracked = TrackedRun(run_id, str(run_checkpoint(config, prepared.corpus_sha1, run_id)))
    else:
        logger.info("trial %d: %s", number, tracked.describe())
    run_id, checkpoint = tracked.run_id, Path(tracked.checkpoint)
    trial.set_user_attr(RUN_ID, run_id)  # so that a search stopped now can continue this run when it resumes
    for key, value in {"tune.study": study_name, TRIAL_TAG: number, "tune.rung": rung}.items():
        mlflow_client.set_tag(run_id, key, str(value))
    progress = TrainingProgress(config, run_id)
    outcome = {"run_id": run_id, "number": number}
    with run_guard(tracked):
        try:
            pruning = TrialPruning(trial, rung, config, measure_of(measure, prepared))
            result = fit(config, prepared, checkpoint, both(progress.hooks(), pruning))
        except (optuna.TrialPruned, TrainingDiverged) as stop:
            outcome |= {"state": "PRUNED", "reason": f"{type(stop).__name__}: {stop}"}
        else:
            value = getattr(result, f"registered_val_{measure}")
            outcome |= {"state": "COMPLETE", "value": value, "epochs": result.epochs, "reason": result.stopped}
            store.log_final(mlflow_client, run_id, result.metrics())
        finally:
            progress.metrics.flush()
        mlflow_client.set_tag(run_id, "tune.state", outcome["state"])
    shutil.rmtree(checkpoint.parent, ignore_errors=True)  # a trial is not resumed: its weights are not kept
    logger.info("trial %d (rung %d, %g min): %s %s", number, rung, config.max_minutes, outcome["state"],
                outcome.get("value") or outcome.get("reason"))  # fmt: skip
    return outcome


@task(name="report-study", task_run_name="report-study", cache_policy=NO_CACHE)
def report_study(
    study: optuna.Study,
    best_number: int,
    space: SearchSpace,
    base: TrainConfig,
    recipe: dict,
    recipe_path: str,
    parent_run_id: str,
) -> dict:
    """Write the best configuration as a recipe; keep the trials' table, the importances and the pictures in the
    Prefect UI and on the parent MLflow run. Returns the best trial's number, value and values."""
    best, (column, label) = study.trials[best_number], MEASURES[space.measure]
    verdict = report.verdict(study, best, label)
    chosen = space.draw(optuna.trial.FixedTrial(best.params), base)
    header = (
        f"The best of search {study.study_name!r} (trial {best.number}, rung {best.user_attrs.get(RUNG, 0)}, "
        f"{label} {best.value:.4g}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, by flows/tune_flow.py"
    )
    Path(recipe_path).parent.mkdir(parents=True, exist_ok=True)
    Path(recipe_path).write_text(to_toml(recipe | chosen, header))
    table, weights = report.trials_table(study, space.measure), report.importances(study)
    get_run_logger().info("search %r: %d trials\n%s", study.study_name, len(table), table.to_string(index=False))
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    create_table_artifact(records, key="tune-trials", description=f"the trials of {study.study_name}")
    lines = [f"# Search {study.study_name}", "", verdict]
    lines += ["", "| param | value | importance |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {weights.get(k, 0):.3f} |" for k, v in chosen.items()]
    link = store.run_link(parent_run_id)
    lines += ["", f"The search's history, the trials' validation curves and the importances as pictures, and the "
              f"trials' table: [the study's MLflow run]({link})"]  # fmt: skip
    create_link_artifact(link, link_text=f"MLflow run {parent_run_id}", key="tune-mlflow-run",
                         description="the study's parent run: pictures, trials, best recipe")  # fmt: skip
    create_markdown_artifact("\n".join(lines), key="tune-best", description="the best configuration, importances")
    mlflow_client = store.client()
    mlflow_client.log_text(parent_run_id, table.to_csv(index=False), "trials.csv")
    mlflow_client.log_text(parent_run_id, table.to_markdown(index=False), "trials.md")
    mlflow_client.log_artifact(parent_run_id, recipe_path)
    with tempfile.TemporaryDirectory() as folder:
        for picture in report.pictures(study, Path(folder), weights):
            mlflow_client.log_artifact(parent_run_id, str(picture))
    metrics = {f"best_{column}": best.value, "trials": len(table)} | {
        f"importance.{k}": v for k, v in weights.items()
    }
    mlflow_client.log_batch(parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    found = {"trial": best.number, "value": best.value, "measure": space.measure, "values": chosen, "verdict": verdict}
    return found | {"importances": weights}
