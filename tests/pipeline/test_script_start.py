"""`python flows/train_flow.py` as users run it: the temporary Prefect server starts during the imports, the run
completes, and the exit handlers still run (server stopped, output flushed) before the quick exit."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT, SMALL_TRAINING


def test_no_early_server_for_help_or_a_configured_api():
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import start_temporary_server

    before = dict(SubprocessASGIServer._instances)
    start_temporary_server(["--help"])()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        start_temporary_server([])()
    assert SubprocessASGIServer._instances == before  # nothing was created, so nothing was started


@pytest.mark.slow
def test_script_run_with_its_own_temporary_server(tmp_path, small_corpus, mlflow_store):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "MLFLOW_TRACKING_URI": mlflow_store, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "flows/train_flow.py", "--corpus", str(small_corpus), "--cache_dir", str(tmp_path / "c")]
    for key, value in SMALL_TRAINING.items():
        argv += [f"--{key}", str(value)]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("Started temporary server") == 1, log[-3000:]  # the early start is the one the flow used
    assert "Starting temporary server" not in log  # (Prefect's line when the flow starts one itself)
    assert re.search(r"registered model 'rnnlm' version 1", log)
    assert re.search(r"training on cpu \(.*\) with (compiled kernels|torch's layers) \(", log)  # the path, and why
    assert "Stopping temporary server" in log  # Prefect's exit handler ran before the quick exit
    port = int(re.search(r"Started temporary server on http://127\.0\.0\.1:(\d+)", log).group(1))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the temporary server outlived the command"
