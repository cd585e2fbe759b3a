"""The search flow on tiny trainings: the pruner stops a diverging trial, the parent and child runs and the written
recipe are what the study holds, and a search killed by SIGKILL resumes without repeating finished trials (the one it
stopped continues its run from its checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, prefect_artifact
from helpers.tune import tiny_search
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL

from flows.tune_flow import run_tune
from rnnlm.config import TrainConfig
from tracking import study as studies

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_pruner_stops_a_diverging_trial_and_the_runs_are_what_the_study_holds(tmp_path, mlflow_store):
    tune = tiny_search(tmp_path, "[lr]\nchoices = [1.0, 2.0, 30.0]\n", promote=True)
    url = studies.default_storage()
    study = studies.open_study("tiny", url)
    for lr in (1.0, 2.0, 30.0):  # two sound trainings first, then one whose perplexity explodes (finite, huge)
        study.enqueue_trial({"lr": lr})

    found = run_tune(tune)

    study = studies.open_study("tiny", url)
    states = {t.params["lr"]: t for t in study.trials}
    assert [states[lr].state.name for lr in (1.0, 2.0, 30.0)] == ["COMPLETE", "COMPLETE", "PRUNED"]
    bad = states[30.0]
    assert len(bad.intermediate_values) == 1 < len(states[1.0].intermediate_values)  # stopped at its first report
    assert "median" in bad.user_attrs["reason"]

    client = MlflowClient(mlflow_store)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trial_runs = {r.info.run_id: r for r in children if "tune.trial" in r.data.tags}
    assert {t.user_attrs["run_id"] for t in study.trials} == set(trial_runs)
    for trial in study.trials:
        run = trial_runs[trial.user_attrs["run_id"]]
        assert float(run.data.params["lr"]) == trial.params["lr"]
        assert run.data.tags["tune.state"] == trial.state.name
        curve = client.get_metric_history(run.info.run_id, "val_perplexity")
        assert len(curve) == len(trial.intermediate_values)  # the validation curve the pruner saw
    assert {"trials.csv", "space.toml", "history.png", "best.toml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    table = prefect_artifact("tune-trials").data  # the Prefect UI's artifacts: the trials, the best, the pictures' run
    rows = table if isinstance(table, list) else json.loads(table)
    assert [(r["trial"], r["state"]) for r in rows] == [(t.number, t.state.name) for t in study.trials]
    assert parent.info.run_id in prefect_artifact("tune-best").data
    assert prefect_artifact("tune-mlflow-run").data.endswith(f"/runs/{parent.info.run_id})")

    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert found["trial"] == best.number and found["values"] == {"lr": best.params["lr"]}
    written = TrainConfig.from_recipe(tmp_path / "best.toml", corpus=tune.corpus)
    assert written.lr == best.params["lr"] and written.max_minutes == tune.final_minutes
    final = client.get_run(found["final"]["run_id"])
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id and final.data.params["lr"] == str(written.lr)
    assert client.get_model_version("rnnlm", str(found["final"]["version"])).run_id == final.info.run_id
    assert client.get_model_version_by_alias("rnnlm", "champion").run_id == final.info.run_id  # --promote: the first


def test_the_base_recipe_is_the_first_trial_at_the_final_budget_and_stays_best_unless_beaten(tmp_path, mlflow_store):
    tune = tiny_search(tmp_path, "[lr]\nchoices = [0.02, 1.0]\n", {"lr": 1.0}, base_trial=True)
    study = studies.open_study("tiny", studies.default_storage())

    found = run_tune(tune)

    study = studies.open_study("tiny", studies.default_storage())
    first, top = study.trials[0], tune.budgets().top()
    assert first.params == {"lr": 1.0} and first.user_attrs[studies.BASE] and first.user_attrs["rung"] == top > 0
    assert [t.user_attrs["rung"] for t in study.trials[1:]] == [0, 0]  # the search's own, at the lowest rung
    assert studies.best(study).number == 0 == found["trial"]  # the only one measured at the final budget
    assert "no configuration beat the base recipe" in found["verdict"]
    assert TrainConfig.from_recipe(tmp_path / "best.toml", corpus=tune.corpus).lr == 1.0


def test_a_search_over_what_a_token_is_ranks_its_trials_by_bits_per_byte(tmp_path, mlflow_store):
    """Characters and words give perplexities that do not compare; their bits per byte of the same held-out bytes
    do: each trial's value is its run's validation bits per byte, and the report says so."""
    held_out = {"held_out": "bytes", "val_tokens": 4000, "test_tokens": 0, "num_epochs": 3}
    tune = tiny_search(tmp_path, "[tokenization]\nchoices = ['char', 'word']\n", held_out, n_trials=2)
    study = studies.open_study("tiny", studies.default_storage())
    for tokenization in ("char", "word"):
        study.enqueue_trial({"tokenization": tokenization})

    found = run_tune(tune)

    study = studies.open_study("tiny", studies.default_storage())
    client = MlflowClient(mlflow_store)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        metrics = client.get_run(trial.user_attrs["run_id"]).data.metrics
        assert trial.value == pytest.approx(metrics["final_registered_val_bits_per_byte"], rel=1e-9)
        assert trial.value != pytest.approx(metrics["final_registered_val_perplexity"])
    best = min(study.trials, key=lambda t: t.value)
    assert found["measure"] == "bits_per_byte" and found["values"] == {"tokenization": best.params["tokenization"]}
    assert "validation bits per byte" in (tmp_path / "best.toml").read_text().splitlines()[0]
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.params["measure"] == "bits_per_byte" and "best_val_bpb" in parent.data.metrics


def _finished(db: Path, states: str = "'COMPLETE', 'PRUNED'") -> list[int]:
    """The numbers of the trials stored in `states` (read straight from the study's SQLite file)."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as connection:
        try:
            rows = connection.execute(f"select number from trials where state in ({states})").fetchall()
        except sqlite3.OperationalError:  # the tables are not there yet
            return []
    return sorted(r[0] for r in rows)


def _checkpoints(tmp_path: Path) -> list[Path]:
    """The resumable checkpoints the search's trainings have left in the cache."""
    return list((tmp_path / "cache").glob("checkpoints/*/*/model.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "ctrl-c"])
def test_a_stopped_search_resumes_without_repeating_finished_trials(tmp_path, mlflow_store, stop):
    space = "[lr]\nlow = 0.5\nhigh = 2.0\n[num_hiddens]\nchoices = [8, 16]\n"
    tune = tiny_search(tmp_path, space, {"num_epochs": 12, "checkpoint_every": 1}, n_trials=4)
    command = [sys.executable, str(PROJECT_ROOT / "flows" / "tune_flow.py")]
    for name in ("config_file", "corpus", "space", "trial_minutes", "final_minutes", "max_minutes", "n_trials",
                 "recipe_out", "study_name"):  # fmt: skip
        command += [f"--{name}", str(getattr(tune, "recipe" if name == "config_file" else name))]
    # the session's Prefect server: a command killed by SIGKILL would leave a temporary server of its own running
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RNNLM_CPU_THREADS": "1"}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    db = Path(mlflow_store.removeprefix("sqlite:///")).parent / "optuna.db"
    with open(tmp_path / "first.err", "w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        # one trial done, one running that has written a checkpoint
        while not (_finished(db) and _finished(db, "'RUNNING'") and _checkpoints(tmp_path)) and process.poll() is None:
            assert time.time() < deadline, "no trial finished in 5 minutes"
            time.sleep(0.2)
        os.kill(process.pid, stop)
        code = process.wait(timeout=120)
    left = {path.parent.name for path in _checkpoints(tmp_path)}  # the stopped trial's run
    if stop == signal.SIGINT:  # as Ctrl-C in a terminal: one line and status 130, no traceback of the stopped trial
        said = (tmp_path / "first.err").read_text()
        assert code == 130 and "\ninterrupted" in said, said[-3000:]
        assert "Traceback" not in said, said[-3000:]
    before, in_flight = _finished(db), _finished(db, "'RUNNING'")
    study = studies.open_study("tiny", f"sqlite:///{db}")
    kept = {t.number: (t.params, t.value) for t in study.trials if t.number in before}
    assert before and in_flight and len(before) < 4

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    study = studies.open_study("tiny", f"sqlite:///{db}")
    assert {t.number: (t.params, t.value) for t in study.trials if t.number in before} == kept  # untouched
    assert len(studies.records(study)) - len([t for t in study.trials if t.state.name == "FAIL"]) == 4
    retried = [t.user_attrs.get("retry_of") for t in study.trials if "retry_of" in t.user_attrs]
    assert not set(retried) & set(before)  # no finished trial ran again
    assert sorted(retried) == in_flight and all(study.trials[n].state.name == "FAIL" for n in in_flight)
    for trial in (t for t in study.trials if "retry_of" in t.user_attrs):  # continued its run, not started over
        stopped_run = study.trials[trial.user_attrs["retry_of"]].user_attrs["run_id"]
        assert stopped_run in left and trial.user_attrs["run_id"] == stopped_run
        run = MlflowClient(mlflow_store).get_run(stopped_run)
        assert run.info.status == "FINISHED" and "rnnlm.resumed_at_epoch" in run.data.tags, run.data.tags
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in study.trials)
    assert study.user_attrs["final"]["version"] >= 1


@pytest.mark.parametrize(
    "space, says",
    [
        ("[hidden]\nchoices = [8]\n", "error: {space}: hidden: no such option"),
        ("[dropout]\nlow = 0.5\nhigh = 0.1\n", "error: {space}: dropout: a bad range: low (0.5) must be below high"),
        ("[dropout]\nlow = 0.5\nhigh = 1.5\n", "error: {space}: dropout: Input should be less than 1"),
    ],
)
def test_a_bad_space_ends_the_command_with_one_error_line_before_any_work(tmp_path, mlflow_store, space, says):
    tune = tiny_search(tmp_path, space)
    command = [sys.executable, str(PROJECT_ROOT / "flows" / "tune_flow.py"), "--config_file", tune.recipe]
    command += ["--corpus", tune.corpus, "--space", tune.space, "--max_minutes", "1"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(says.format(space=tune.space))
    assert not (Path(mlflow_store.removeprefix("sqlite:///")).parent / "optuna.db").exists()  # nothing started
