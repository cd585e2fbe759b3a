"""Faults and bad input through the real flow (temporary Prefect server, private MLflow store, loopback servers):
each fails early with a clear message, or recovers, and the tracking store never tells a lie."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import CountingHandler, flow_config
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.train_flow import train_flow
from rnnlm.checkpoint import best_checkpoint, load_checkpoint, run_checkpoint, save_checkpoint
from rnnlm.data import fetch, prepare_data
from rnnlm.run import fit
from tracking.runs import TRIAL_TAG, lock_of, start_or_resume, try_lock, unlock
from tracking.store import TrackingError, check_reachable, experiment_id

pytestmark = pytest.mark.usefixtures("prefect_harness")


def runs_of(store: str) -> list:
    client = MlflowClient(store)
    experiment_ = client.get_experiment_by_name("rnnlm")
    return client.search_runs([experiment_.experiment_id]) if experiment_ else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the tracking server -------------------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(tmp_path, corpus_url, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the bound: one health check whose refused connection fails it at once (no timeout waited, no retries)
    with pytest.raises(Exception, match=f"MLflow tracking server at {uri} is unreachable \\(ConnectionError\\)") as err:
        train_flow(flow_config(tmp_path, corpus_url))
    assert "mlflow server --host 127.0.0.1" in str(err.value)
    assert CountingHandler.requests_seen == []  # before any download, so before any training
    assert not (tmp_path / "cache" / "checkpoints").exists()
    # "in seconds", without a clock: one attempt (MLflow's own client would retry with backoff for minutes) ...
    hang_up = Listener(hold=0)
    with pytest.raises(TrackingError, match=r"unreachable \(ConnectionError\)"):
        check_reachable(hang_up.uri)
    assert hang_up.connections() == 1
    # ... that gives up by itself, long before a server that stays silent for 12 times its timeout (5 s) would
    silent = Listener(hold=60)
    with pytest.raises(TrackingError, match=r"unreachable \(ReadTimeout\)"):
        check_reachable(silent.uri)
    assert silent.connections() == 1 and silent.outcome == "the client hung up"


class Listener:
    """A loopback TCP server whose first connection it ends after `hold` seconds of silence (at once for 0), recording
    who hung up; it counts the connections made to it (its backlog drained once the client is done)."""

    def __init__(self, hold: float):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.hold, self.outcome = hold, None
        self.thread = threading.Thread(target=self._first, daemon=True)
        self.thread.start()

    def _first(self) -> None:
        conn, _ = self.socket.accept()
        with conn:
            conn.settimeout(self.hold or None)
            try:
                while self.hold and conn.recv(4096):  # the request, then silence until one side hangs up
                    pass
                self.outcome = "the client hung up" if self.hold else "the server hung up"
            except TimeoutError:
                self.outcome = "the server hung up"

    def connections(self) -> int:
        """The connections made so far; call it once the client has returned (its connections are all made)."""
        self.thread.join()
        count = 1
        self.socket.setblocking(False)
        with self.socket:
            while True:
                try:
                    self.socket.accept()[0].close()
                except BlockingIOError:
                    return count
                count += 1


def test_silent_tracking_server_times_out(tmp_path, corpus_url, monkeypatch):
    connections = []

    def accept_and_say_nothing(listener: socket.socket) -> None:
        while True:
            try:
                connections.append(listener.accept()[0])
            except OSError:  # closed: the test is over
                return

    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        threading.Thread(target=accept_and_say_nothing, args=(listener,), daemon=True).start()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(Exception, match=f"{uri} is unreachable \\(ReadTimeout\\)"):
            train_flow(flow_config(tmp_path, corpus_url))
        assert len(connections) == 1  # the bound: one health check's read timeout, no retries
    for connection in connections:
        connection.close()
    assert CountingHandler.requests_seen == []


# --- bad corpora -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no tokens after 'book' preprocessing"),
        (b"1234 5678 -- !!! ???\n" * 500, "holds no tokens after 'book' preprocessing"),
        (bytes(range(256)) * 40, "looks binary"),
        ("caf\xe9 au lait, ".encode("latin-1") * 500, "not valid UTF-8.*iconv"),
        (b"far too short\n", "needed for one minibatch"),
    ],
    ids=["empty", "only-non-letters", "binary", "latin-1", "shorter-than-a-batch"],
)
def test_bad_corpus_fails_before_any_run(tmp_path, mlflow_store, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(Exception, match=message):
        train_flow(flow_config(tmp_path, str(path), val_tokens=0))
    assert runs_of(mlflow_store) == []
    assert not (tmp_path / "cache" / "checkpoints").exists()


def test_max_tokens_beyond_the_corpus_uses_what_there_is_and_says_so(tmp_path, small_corpus):
    config = flow_config(tmp_path, str(small_corpus), max_tokens=10**9, val_tokens=1000)
    data = prepare_data(small_corpus, config)
    assert data.train_tokens == data.num_tokens - 1000
    assert f"max_tokens=1,000,000,000 but only {data.train_tokens:,} tokens" in data.note


# --- divergence ------------------------------------------------------------------------------------------------


def test_divergence_fails_the_run_with_the_reason_and_registers_nothing(tmp_path, corpus_url, mlflow_store):
    config = flow_config(tmp_path, corpus_url, lr=1e6, registered_model="diverged")
    with pytest.raises(Exception, match="diverged at epoch 1.*lower --lr.*--grad_clip"):
        train_flow(config)
    [run] = runs_of(mlflow_store)
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["failure_reason"]
    assert MlflowClient(mlflow_store, registry_uri=mlflow_store).search_registered_models("name = 'diverged'") == []
    # not retried: it would only diverge again
    assert task_states_of_last_run(run)["train-rnn-32"] == "Failed"


def task_states_of_last_run(run) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


# --- resume through the flow -------------------------------------------------------------------------------------


@pytest.mark.slow  # waits for SQLite's lock timeout and the task's 5 s retry delay
def test_prefect_retry_of_the_training_task_resumes(tmp_path, corpus_url, mlflow_store):
    """A real fault mid-training: the MLflow SQLite database is held locked by another connection, so the metrics
    write at epoch 4 fails; the task is retried after its delay and continues from the epoch-2 checkpoint."""
    config = flow_config(tmp_path, corpus_url, num_epochs=8, eval_every=4, checkpoint_every=2)
    folder = tmp_path / "cache" / "checkpoints"
    released = threading.Event()

    def lock_the_store_mid_training() -> None:
        db = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
        while not any(_epoch(p) >= 2 for p in folder.rglob("*.pt")):
            time.sleep(0.02)
        db.execute("BEGIN EXCLUSIVE")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _awaiting_retry():
            time.sleep(0.1)
        db.execute("ROLLBACK")
        db.close()
        released.set()

    locker = threading.Thread(target=lock_the_store_mid_training, daemon=True)
    locker.start()
    out = train_flow(config)
    assert released.wait(5)
    client = MlflowClient(mlflow_store, registry_uri=mlflow_store)
    [run] = runs_of(mlflow_store)
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(out["run_id"], "train_perplexity"))
    assert steps == list(range(1, 9))  # every epoch once: none lost with the failed write, none repeated
    [train_run] = [r for r in _task_runs(out["run_id"], run) if r.name.startswith("train-")]
    assert train_run.run_count == 2 and train_run.state.name == "Completed"


def _epoch(path) -> int:
    try:
        return load_checkpoint(path)["epoch"]
    except (ValueError, FileNotFoundError):
        return 0


def _awaiting_retry() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-")))
    return any(r.state and r.state.name == "AwaitingRetry" for r in runs)


def _task_runs(run_id: str, run) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.data.tags["prefect.flow_run_id"]]))
        return client.read_task_runs(flow_run_filter=flow_run)


def _interrupted_run(tmp_path, corpus, store, **overrides):
    """Train 2 of 4 epochs in a flow that fails (a crash), leaving a checkpoint; returns (config, run, checkpoint)."""
    config = flow_config(tmp_path, corpus, num_epochs=4, eval_every=2, checkpoint_every=2, **overrides)
    data = prepare_data(fetch(config), config)
    run_id = MlflowClient(store).create_run(experiment_id("rnnlm")).info.run_id
    path = run_checkpoint(config, data.corpus_sha1, run_id)
    half = config.model_copy(update={"num_epochs": 2})
    fit(half, data, path, run_id=run_id)  # then make it look like the 4-epoch run it was part of
    ckpt = load_checkpoint(path)
    ckpt["config"] = config.model_dump(mode="json")
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k != "format_version"})
    MlflowClient(store).set_terminated(run_id, "FAILED")
    return config, run_id, path


def test_run_deleted_from_the_store_is_continued_as_a_new_linked_run(tmp_path, small_corpus, mlflow_store):
    config, old_id, path = _interrupted_run(tmp_path, str(small_corpus), mlflow_store)
    MlflowClient(mlflow_store, registry_uri=mlflow_store).delete_run(old_id)
    out = train_flow(config)
    client = MlflowClient(mlflow_store, registry_uri=mlflow_store)
    new = client.get_run(out["run_id"])
    assert out["run_id"] != old_id and new.info.status == "FINISHED"
    assert new.data.tags["rnnlm.resumed_from_run"] == old_id and new.data.tags["rnnlm.resumed_at_epoch"] == "2"
    assert sorted(m.step for m in client.get_metric_history(out["run_id"], "train_perplexity")) == [1, 2, 3, 4]
    assert not path.exists()  # the checkpoint moved to the new run


def test_a_run_continued_as_a_new_run_keeps_its_best_weights(tmp_path, small_corpus, mlflow_store):
    """The checkpoint of a run this store cannot reopen moves to the new run with the best weights kept beside it:
    they may be the ones to register (a run continued at its last epoch registered its last weights instead)."""
    config, old_id, path = _interrupted_run(tmp_path, str(small_corpus), mlflow_store)
    best = best_checkpoint(path).read_bytes()
    MlflowClient(mlflow_store, registry_uri=mlflow_store).delete_run(old_id)
    data = prepare_data(fetch(config), config)
    tracked = flow(name="claim-a-run")(lambda: start_or_resume(config, data))()  # its MLflow run tags the flow run
    try:
        assert tracked.continues == old_id and tracked.resumed_at_epoch == 2
        assert best_checkpoint(Path(tracked.checkpoint)).read_bytes() == best
        assert not path.parent.exists()
    finally:
        unlock(tracked.lock)


def test_failed_run_with_a_checkpoint_is_reopened(tmp_path, small_corpus, mlflow_store):
    config, old_id, _ = _interrupted_run(tmp_path, str(small_corpus), mlflow_store)
    out = train_flow(config)
    assert out["run_id"] == old_id and out["epochs"] == 4
    assert MlflowClient(mlflow_store, registry_uri=mlflow_store).get_run(old_id).info.status == "FINISHED"


def test_a_stopped_search_trials_checkpoint_is_left_to_its_own_retry(tmp_path, small_corpus, mlflow_store):
    config, trial_id, path = _interrupted_run(tmp_path, str(small_corpus), mlflow_store)
    client = MlflowClient(mlflow_store, registry_uri=mlflow_store)
    client.set_tag(trial_id, TRIAL_TAG, "3")
    out = train_flow(config)  # the same configuration, trained on its own (a search's final training, say)
    assert out["run_id"] != trial_id and out["epochs"] == 4
    assert client.get_run(out["run_id"]).data.tags.get("rnnlm.resumed_at_epoch") is None  # trained from scratch
    assert client.get_run(trial_id).info.status == "FAILED"  # the trial's run and checkpoint, left for its retry
    assert load_checkpoint(path)["epoch"] == 2 and try_lock(lock_of(path))  # (which tests/pipeline/test_tune.py runs)
    unlock(lock_of(path))


def test_checkpoint_for_another_vocab_is_refused_before_training(tmp_path, small_corpus, mlflow_store):
    config, old_id, path = _interrupted_run(tmp_path, str(small_corpus), mlflow_store)
    ckpt = load_checkpoint(path)
    ckpt["vocab"] = ckpt["vocab"][:-1]
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k != "format_version"})
    with pytest.raises(Exception, match="vocab: checkpoint has .* tokens.*--resume never"):
        train_flow(config)
    assert MlflowClient(mlflow_store, registry_uri=mlflow_store).get_run(old_id).info.status == "FAILED"  # untouched
    out = train_flow(config.model_copy(update={"resume": "never"}))
    assert out["run_id"] != old_id and out["epochs"] == 4


def test_finished_runs_are_not_resumed(tmp_path, small_corpus, mlflow_store):
    config = flow_config(tmp_path, str(small_corpus), num_epochs=2, eval_every=1)
    first = train_flow(config)
    second = train_flow(config)
    assert second["run_id"] != first["run_id"]
    assert len(runs_of(mlflow_store)) == 2
