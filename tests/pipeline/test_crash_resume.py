"""Real processes: `kill -9` and Ctrl-C (SIGINT) of the training command, then the same command again; and three
flows started at once on one SQLite store. Each command is `python flows/train_flow.py ...` in its own process
group, using this session's Prefect server (as with `prefect server start`) and a private MLflow store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, resume_settings, small_text
from mlflow.tracking import MlflowClient

from rnnlm.checkpoint import checkpoint_folder, load_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.corpus import sha1_of
from rnnlm.cpu.threads import torch_threads
from rnnlm.data import prepare_data
from rnnlm.run import FitResult, fit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

NUM_EPOCHS = 12


def settings(tmp_path: Path, corpus: Path, **overrides) -> dict:
    return resume_settings(
        tmp_path, corpus, **{"num_epochs": NUM_EPOCHS, "checkpoint_every": 1, "num_preds": 10, **overrides}
    )


def start(args: dict, store: str, log: Path) -> subprocess.Popen:
    """`python flows/train_flow.py --k v ...` in a new process group, output to `log`."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "OMP_NUM_THREADS": "1",  # the reference run below uses one thread too: same arithmetic, same numbers
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "flows/train_flow.py"]
    for key, value in args.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]  # a flag stands alone
    out = open(log, "ab")  # noqa: SIM115 (closed with the process in finish())
    return subprocess.Popen(
        argv, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    """Wait for the command; whatever happens, nothing it started stays behind."""
    try:
        return process.wait(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.stdout and process.stdout.close()


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300):
    """Poll `condition()` until it returns a true value; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process.poll() is not None:
            pytest.fail(f"the training command exited ({process.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def checkpoint_epoch(folder: Path) -> int:
    """Highest epoch among the checkpoints in `folder` (0 for none)."""
    epochs = [0]
    for path in folder.rglob("*.pt"):
        try:
            epochs.append(load_checkpoint(path)["epoch"])
        except (ValueError, FileNotFoundError):  # renamed away between glob and load
            pass
    return max(epochs)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(small_text(3000))
    return path


@pytest.fixture
def store(tmp_path) -> str:
    """A private MLflow SQLite store that does not exist yet (the first command creates it)."""
    (tmp_path / "mlruns").mkdir()
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def reference_run(tmp_path: Path, args: dict) -> FitResult:
    """The same training, uninterrupted, in this process, with the threads of a process started as the commands are
    (OMP_NUM_THREADS=1): torch's setting one, which the run reads as it starts, so torch's LSTM (where it is this
    machine's choice) trains on one thread too (two threads sum in another order and failed the comparison on a Zen
    3)."""
    config = TrainConfig(**{**args, "cache_dir": str(tmp_path / "reference-cache")})
    data = prepare_data(Path(args["corpus"]), config)
    with torch_threads(1):
        return fit(config, data, tmp_path / "reference.pt")


def the_run(store: str):
    client = MlflowClient(store, registry_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("rnnlm").experiment_id])
    return client, run


def assert_epochs_logged_once(client: MlflowClient, run_id: str, epochs: int = NUM_EPOCHS) -> None:
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_perplexity"))
    assert steps == list(range(1, epochs + 1))


def latest_checkpoint(folder: Path) -> dict:
    """The resumable checkpoint in `folder` (an empty dict while there is none, or while it is being renamed)."""
    for path in folder.rglob("model.pt"):
        try:
            return load_checkpoint(path)
        except (ValueError, FileNotFoundError):
            pass
    return {}


def test_kill_9_then_same_command_resumes_and_matches_an_uninterrupted_run(tmp_path, corpus, store):
    args = settings(tmp_path, corpus)
    config = TrainConfig(**args)
    folder = checkpoint_folder(config, sha1_of(corpus))
    kill_after = random.randint(2, NUM_EPOCHS - 3)
    print(f"killing after epoch {kill_after}")

    first = start(args, store, tmp_path / "first.log")
    try:
        wait_for(lambda: checkpoint_epoch(folder) >= kill_after, f"epoch {kill_after}", first)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        code = finish(first)
    assert code == -signal.SIGKILL
    killed_at = checkpoint_epoch(folder)
    assert kill_after <= killed_at < NUM_EPOCHS
    client, run = the_run(store)
    assert run.info.status == "RUNNING"  # kill -9 leaves no chance to say otherwise; the next run fixes it

    assert finish(start(args, store, tmp_path / "second.log")) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"resuming MLflow run {run.info.run_id}" in log
    assert "resuming training from the checkpoint at epoch" in log

    client, resumed = the_run(store)  # still one run: the same one, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert_epochs_logged_once(client, run.info.run_id)
    reference = reference_run(tmp_path, args)
    metrics = resumed.data.metrics
    assert metrics["final_train_perplexity"] == reference.train_perplexity  # exactly equal on CPU
    assert metrics["final_val_perplexity"] == reference.val_perplexity
    [version] = client.search_model_versions("name = 'rnnlm'")
    assert version.run_id == run.info.run_id


REGULARISED = dict(
    rnn="lstm", num_layers=2, embedding_dim=16, num_hiddens=16, dropout=0.3, weight_drop=0.3, embed_dropout=0.1,
    locked_dropout=True, ar_alpha=2.0, tar_beta=1.0, variable_steps=True, optimizer="ntasgd", asgd_patience=1,
    max_tokens=3000, val_max_tokens=400, eval_every_steps=5, checkpoint_every_steps=4, num_epochs=4,
)  # fmt: skip


def test_kill_9_inside_an_epoch_with_every_regulariser_on_resumes_identically(tmp_path, corpus, store):
    args = settings(tmp_path, corpus, **REGULARISED)
    folder = checkpoint_folder(TrainConfig(**args), sha1_of(corpus))

    def averaging_inside_an_epoch() -> bool:  # NT-ASGD's average and the variable windows' place in the checkpoint
        saved = latest_checkpoint(folder)
        return saved.get("averaged_steps", 0) > 0 and saved["batch"] > 0 and saved["epoch"] < args["num_epochs"] - 1

    first = start(args, store, tmp_path / "first.log")
    try:
        wait_for(averaging_inside_an_epoch, "a checkpoint inside an epoch with averaged weights", first)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        code = finish(first)
    assert code == -signal.SIGKILL
    assert finish(start(args, store, tmp_path / "second.log")) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert "resuming training from the checkpoint" in log and "training on cpu" in log  # with the engine's line

    client, resumed = the_run(store)
    assert resumed.info.status == "FINISHED"
    assert_epochs_logged_once(client, resumed.info.run_id, args["num_epochs"])
    reference = reference_run(tmp_path, args)
    metrics = resumed.data.metrics
    assert metrics["final_train_perplexity"] == reference.train_perplexity  # exactly equal on CPU
    assert metrics["final_val_perplexity"] == reference.val_perplexity
    assert metrics["final_registered_val_perplexity"] == reference.registered_val_perplexity


def test_ctrl_c_checkpoints_marks_killed_and_the_next_run_resumes(tmp_path, corpus, store):
    args = settings(tmp_path, corpus, checkpoint_every=1000)  # only Ctrl-C and the end write checkpoints
    config = TrainConfig(**args)
    folder = checkpoint_folder(config, sha1_of(corpus))
    log = tmp_path / "first.log"

    first = start(args, store, log)
    try:
        wait_for(lambda: f"epoch 2/{NUM_EPOCHS}" in log.read_text(), "epoch 2", first)
        os.kill(first.pid, signal.SIGINT)
    finally:
        code = finish(first)
    assert code != 0
    stopped_at = checkpoint_epoch(folder)
    assert 2 <= stopped_at < NUM_EPOCHS, log.read_text()[-3000:]
    client, run = the_run(store)
    assert run.info.status == "KILLED"
    assert "KeyboardInterrupt" in run.data.tags["failure_reason"]
    assert client.search_model_versions("name = 'rnnlm'") == []

    assert finish(start(args, store, tmp_path / "second.log")) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert f"from its checkpoint at epoch {stopped_at}" in (tmp_path / "second.log").read_text()
    client, resumed = the_run(store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert (
        "failure_reason" not in resumed.data.tags and "KeyboardInterrupt" in resumed.data.tags["rnnlm.previous_failure"]
    )
    assert_epochs_logged_once(client, run.info.run_id)


def test_three_flows_at_once_on_one_new_sqlite_store_all_register(tmp_path, corpus, store):
    args = settings(tmp_path, corpus, num_epochs=4, checkpoint_every=2)  # the very same command, three times
    processes = [start(args, store, tmp_path / f"run{i}.log") for i in range(3)]
    codes = [finish(p) for p in processes]
    logs = [(tmp_path / f"run{i}.log").read_text()[-3000:] for i in range(3)]
    assert codes == [0, 0, 0], logs
    client = MlflowClient(store, registry_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("rnnlm").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    versions = client.search_model_versions("name = 'rnnlm'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    for run in runs:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_perplexity")) == [1, 2, 3, 4]
