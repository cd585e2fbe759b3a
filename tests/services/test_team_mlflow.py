"""MLflow for a team: `mlflow server` on PostgreSQL with proxied artifacts, reached only via MLFLOW_TRACKING_URI.

A small flow (another process) and a two-way sweep run against it at the same time; runs, metrics and registry
versions are then checked through the server's API.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
from helpers import PROJECT_ROOT, SMALL_TRAINING, small_text
from helpers.services import mlflow_server, postgres_bin, postgres_server
from mlflow.tracking import MlflowClient

from flows.sweep_flow import SweepConfig, Variant, run_sweep
from rnnlm.config import TrainConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql)"),
]


def test_flow_and_sweep_in_parallel_on_postgres(tmp_path, monkeypatch):
    corpus = tmp_path / "small.txt"
    corpus.write_text(small_text(2500))
    (tmp_path / "artifacts").mkdir()
    with postgres_server() as database, mlflow_server(database, tmp_path / "artifacts") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        cli = [f"--{k}={v}" for k, v in SMALL_TRAINING.items()] + [
            f"--corpus={corpus}",
            f"--cache_dir={tmp_path / 'c1'}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        single = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "flows" / "train_flow.py"), *cli],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        base = TrainConfig(corpus=str(corpus), cache_dir=str(tmp_path / "c2"), **SMALL_TRAINING)
        records = run_sweep(SweepConfig(base=base, variants=[Variant(rnn="gru"), Variant(rnn="lstm")]))
        output, _ = single.communicate(timeout=600)
        assert single.returncode == 0, output[-3000:]

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("rnnlm")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == 4 and len(children) == 2  # the single run, the sweep's parent and its two members
        assert all(r.info.status == "FINISHED" for r in runs)
        for record in records:
            assert [m.step for m in client.get_metric_history(record["run_id"], "train_perplexity")] == [1, 2]
            assert client.get_model_version("rnnlm", str(record["version"])).run_id == record["run_id"]
        versions = client.search_model_versions("name = 'rnnlm'")
        assert len(versions) == 3
        artifact_uri = client.get_run(records[0]["run_id"]).info.artifact_uri
        assert artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
        assert any(p.name == "model.pt" for p in (tmp_path / "artifacts").rglob("*"))
