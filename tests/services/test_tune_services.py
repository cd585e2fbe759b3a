"""The search against real services: trials on a local Dask cluster (a scheduler and two workers as processes), the
study shared through its database; the study in PostgreSQL (`--storage`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.services import postgres_bin, postgres_server
from helpers.tune import tiny_search
from mlflow.tracking import MlflowClient
from test_sweep import dask_cluster  # noqa: F401  (the fixture: a real scheduler and two workers)

from flows.tune_flow import run_tune
from tracking import study as studies

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.slow
def test_trials_run_in_parallel_on_a_real_dask_cluster(tmp_path, mlflow_store, dask_cluster):  # noqa: F811
    from distributed import Client

    tune = tiny_search(tmp_path, "[lr]\nlow = 0.5\nhigh = 2.0\n", n_trials=4, dask_address=dask_cluster)
    found = run_tune(tune)

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
    assert found["final"]["version"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql)")
def test_the_study_lives_in_postgresql_when_storage_names_it(tmp_path, mlflow_store):
    with postgres_server() as database:
        found = run_tune(tiny_search(tmp_path, "[lr]\nlow = 0.5\nhigh = 2.0\n", n_trials=2, storage=database))
        study = studies.open_study("tiny", database)
        assert len(study.trials) == 2 and study.user_attrs["final"] == found["final"]
    assert not (Path(mlflow_store.removeprefix("sqlite:///")).parent / "optuna.db").exists()  # not the default
