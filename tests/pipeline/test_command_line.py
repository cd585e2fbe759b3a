"""The training command line as users meet it: scheduling options refused before anything starts, and a user's
mistake ending with one line that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT

from flows.train_flow import main


def test_cron_without_serve_is_refused():
    with pytest.raises(SystemExit, match="--cron schedules the deployment made by --serve"):
        main(["--cron", "0 3 * * *"])


def test_compare_cli_refuses_a_negative_margin():
    from flows.compare_flow import main as compare_main

    with pytest.raises(SystemExit, match="--promote_margin"):
        compare_main(["--promote_margin", "-0.1"])


def _script(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python flows/train_flow.py ARGS` as a user runs it, with a private MLflow store and Prefect home."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "RNNLM_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "flows/train_flow.py", *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_folder_as_corpus_ends_with_one_line_saying_so(tmp_path):
    done = _script(tmp_path, "--corpus", str(tmp_path), "--num_epochs", "1")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1
    assert output[-1] == f"error: corpus '{tmp_path}' is a folder; give the path of a text file (or an http(s) URL)"
    assert len(output) <= 3 and "Traceback" not in done.stderr  # at most Prefect's server goodbye before it
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


@pytest.mark.slow
def test_a_corpus_too_short_fails_in_the_flow_without_tracebacks(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("far too short\n")
    done = _script(tmp_path, "--corpus", str(corpus), "--val_tokens", "0", "--num_epochs", "1")
    assert done.returncode == 1
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith("error: the corpus gives 13 training tokens, fewer than the 1,156 needed")
    assert "Traceback" not in done.stdout + done.stderr
