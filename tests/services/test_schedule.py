"""Schedule training: a real `prefect server start`, the training flow served with a cron schedule, a run triggered
through the API with `run_deployment`, and its MLflow run and registry version checked.

Everything Prefect here runs in subprocesses pointed at that server, so this test process keeps its own settings
(the session's temporary server of the other tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
from helpers import PROJECT_ROOT, REGISTRY_SIZE, SMALL_TRAINING
from helpers.services import service_env, start, stop, tail
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

CRON = "0 3 * * *"
TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("train-rnnlm/train-rnnlm", parameters=json.loads(sys.argv[1]), timeout=900, poll_interval=2)
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message}))
"""


def wait_for_deployment(api: str, process, log, timeout: float = 240) -> dict:
    """The deployment as the server stores it, once `flow.serve` has created it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the serving process exited:\n{tail(log)}"
        response = requests.get(f"{api}/deployments/name/train-rnnlm/train-rnnlm", timeout=10)
        if response.status_code == 200:
            return response.json()
        time.sleep(2)
    raise TimeoutError(f"no deployment after {timeout} s:\n{tail(log)}")


def test_served_deployment_is_scheduled_and_runs_from_the_api(tmp_path, small_corpus, mlflow_store, prefect_server):
    client_env = service_env(
        PREFECT_API_URL=prefect_server["PREFECT_API_URL"],
        PREFECT_HOME=str(tmp_path / "prefect-client-home"),
        MLFLOW_TRACKING_URI=mlflow_store,
        MLFLOW_REGISTRY_URI=mlflow_store,
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # pick up the triggered run within seconds
    )
    options = {**SMALL_TRAINING, **REGISTRY_SIZE, "corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache")}
    flags = [f"--{name}={value}" for name, value in options.items()]
    serve_log = tmp_path / "serve.log"
    command = [sys.executable, "flows/train_flow.py", "--serve", "--cron", CRON, *flags]
    serving = start(command, client_env, serve_log, cwd=PROJECT_ROOT)
    try:
        deployment = wait_for_deployment(prefect_server["PREFECT_API_URL"], serving, serve_log)
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["cron"] == CRON and schedule["active"]
        defaults = deployment["parameters"]["config"]
        assert defaults["num_epochs"] == SMALL_TRAINING["num_epochs"] and defaults["corpus"] == str(small_corpus)
        assert "config" in deployment["parameter_openapi_schema"]["properties"]  # the UI's form

        # A run as the UI's "Custom run" form makes it: the config with one field changed.
        params = {"config": {**defaults, "num_epochs": 1, "promote": True}}
        trigger = subprocess.run(
            [sys.executable, "-c", TRIGGER, json.dumps(params)],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert trigger.returncode == 0, trigger.stderr[-4000:]
        run = json.loads(trigger.stdout.strip().splitlines()[-1])
        assert run["state"] == "COMPLETED", f"{run}\n{tail(serve_log)}"
    finally:
        stop(serving)

    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    experiment = client.get_experiment_by_name("rnnlm")
    [mlflow_run] = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["num_epochs"] == "1"
    [version] = client.search_model_versions("name = 'rnnlm'")
    assert version.run_id == mlflow_run.info.run_id
    assert client.get_model_version_by_alias("rnnlm", "champion").version == version.version


def test_prefect_yaml_deploys_the_same_deployment_to_a_process_pool(tmp_path, prefect_server):
    api = prefect_server["PREFECT_API_URL"]
    env = service_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-client-home"))
    prefect = [sys.executable, "-m", "prefect"]
    for command in (
        ["work-pool", "create", "rnnlm-process", "--type", "process"],
        ["--no-prompt", "deploy", "--name", "train-rnnlm"],
    ):
        done = subprocess.run(prefect + command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployment = requests.get(f"{api}/deployments/name/train-rnnlm/train-rnnlm", timeout=10).json()
    assert deployment["work_pool_name"] == "rnnlm-process"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [CRON]
    assert deployment["entrypoint"] == "flows/train_flow.py:train_flow"
    [step] = deployment["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(PROJECT_ROOT)
