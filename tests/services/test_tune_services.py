"""The search against real services: trials on a local Dask cluster (a scheduler and two workers as processes), the
study shared through its database; the study in PostgreSQL (`--storage`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT
from helpers.services import postgres_bin, postgres_server
from helpers.tune import tiny_search
from mlflow.tracking import MlflowClient
from test_sweep import dask_cluster  # noqa: F401  (the fixture: a real scheduler and two workers)

from flows.tune_flow import run_tune
from tracking import study as studies

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.slow
def test_the_command_runs_its_trials_in_parallel_on_a_real_dask_cluster(tmp_path, mlflow_store, dask_cluster):  # noqa: F811
    """`python flows/tune_flow.py --dask_address` as docs/tuning.md gives it: the trials' flow travels to the
    workers by reference (as `__main__`'s it could not be pickled: the command failed before its first trial)."""
    from distributed import Client
    from prefect.settings import get_current_settings

    tune = tiny_search(tmp_path, "[lr]\nlow = 0.5\nhigh = 2.0\n", n_trials=4, dask_address=dask_cluster)
    command = [sys.executable, str(PROJECT_ROOT / "flows" / "tune_flow.py")]
    for name in ("config_file", "corpus", "space", "trial_minutes", "final_minutes", "max_minutes", "n_trials",
                 "recipe_out", "study_name", "dask_address"):  # fmt: skip
        command += [f"--{name}", str(getattr(tune, "recipe" if name == "config_file" else name))]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PREFECT_API_URL": get_current_settings().api.url}
    done = subprocess.run(command + ["--no-base_trial"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    study = studies.open_study("tiny", studies.default_storage())
    assert len(study.trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    client = MlflowClient(mlflow_store)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.params["runner"] == dask_cluster
    for trial in study.trials:
        assert client.get_run(trial.user_attrs["run_id"]).data.tags["mlflow.parentRunId"] == parent.info.run_id
    with Client(dask_cluster, timeout=60) as dask:
        executed = dask.run(lambda dask_worker: dask_worker.state.executed_count)
    assert sum(executed.values()) >= 4 and all(count > 0 for count in executed.values()), executed  # both workers
    assert study.user_attrs["final"]["version"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql)")
def test_the_study_lives_in_postgresql_when_storage_names_it(tmp_path, mlflow_store):
    with postgres_server() as database:
        found = run_tune(tiny_search(tmp_path, "[lr]\nlow = 0.5\nhigh = 2.0\n", n_trials=2, storage=database))
        study = studies.open_study("tiny", database)
        assert len(study.trials) == 2 and study.user_attrs["final"] == found["final"]
    assert not (Path(mlflow_store.removeprefix("sqlite:///")).parent / "optuna.db").exists()  # not the default
