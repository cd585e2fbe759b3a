"""Prefect for a team: a real `prefect server start`, a process work pool, one worker, and a two-configuration
sweep fanned out through the training deployment (`run_deployment`), as it would be across GPU machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, SMALL_TRAINING, small_text
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _run(args: list[str], env: dict, timeout: float = 300) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_sweep_through_a_work_pool_and_worker(tmp_path, prefect_server):
    corpus = tmp_path / "small.txt"
    corpus.write_text(small_text(2500))
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = prefect_server | {"MLFLOW_TRACKING_URI": store}
    prefect = str(Path(sys.executable).with_name("prefect"))
    _run([prefect, "work-pool", "create", "rnnlm-process", "--type", "process"], env)
    _run([prefect, "--no-prompt", "deploy", "--name", "train-rnnlm"], env)  # prefect.yaml, as docs/deploy.md
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "rnnlm-process", "--limit", "2"],
        env=env,
        stdout=open(tmp_path / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        variants = json.dumps([{"rnn": "rnn"}, {"rnn": "gru"}])
        base = [f"--base.{k}={v}" for k, v in SMALL_TRAINING.items()]
        base += [f"--base.corpus={corpus}", f"--base.cache_dir={tmp_path / 'cache'}"]
        _run(
            [
                sys.executable,
                "flows/sweep_flow.py",
                *base,
                f"--variants={variants}",
                "--deployment=train-rnnlm/train-rnnlm",
            ],
            env,
            timeout=900,
        )
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("rnnlm").experiment_id])
    members = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(members) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["rnn"] for r in members} == {"rnn", "gru"}
    assert len(client.search_model_versions("name = 'rnnlm'")) == 2
    log = (tmp_path / "worker.log").read_text()
    assert all(r.data.tags["prefect.flow_run_id"] in log for r in members)  # the worker ran both
