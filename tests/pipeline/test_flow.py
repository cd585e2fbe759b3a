"""The real flow under a temporary Prefect server, with a private MLflow store and a corpus served over loopback."""

from __future__ import annotations

import mlflow
import pytest
from helpers import CountingHandler, flow_config
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_flow_trains_logs_and_registers(tmp_path, corpus_url, mlflow_store):
    config = flow_config(tmp_path, corpus_url)
    out = train_flow(config)

    client = MlflowClient(mlflow_store)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    for name, value in config.model_dump(mode="json").items():
        assert run.data.params[name] == str(value)
    assert {"corpus_file_sha1", "vocab_size", "torch_version", "git_commit"} <= run.data.params.keys()
    assert run.data.tags["device"].startswith("cpu") and run.data.tags["matmuls"] == "float32"
    assert run.data.tags["engine"].startswith(("compiled kernels (", "torch's layers ("))  # which path, and why
    history = client.get_metric_history(out["run_id"], "train_perplexity")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(out["run_id"], "val_perplexity")] == [2, 4]
    assert history[-1].value < history[0].value
    assert run.data.metrics["final_train_perplexity"] == pytest.approx(out["train_perplexity"])
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"samples.json", "perplexity.png", "vocab.json", "checkpoint"} <= artifacts

    version = client.get_model_version("rnnlm", str(out["version"]))
    assert version.run_id == out["run_id"]
    assert float(version.tags["val_perplexity"]) == pytest.approx(out["registered_val_perplexity"])
    assert version.tags["rnn"] == "rnn"

    model = mlflow.pyfunc.load_model(f"models:/rnnlm/{out['version']}")
    [text] = model.predict(["time traveller"])
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 50
    sampled = model.predict(["the", "a"], params={"num_preds": 10, "temperature": 0.8, "top_k": 5, "seed": 1})
    assert [len(t) for t in sampled] == [13, 11]


def test_second_run_reuses_corpus_and_vocab(tmp_path, corpus_url, mlflow_store):
    config = flow_config(tmp_path, corpus_url, num_epochs=1, eval_every=1)
    train_flow(config)
    assert CountingHandler.requests_seen == ["/book.txt"]
    prepared = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "prepared").rglob("*") if p.is_file()}
    assert {p.name for p in prepared} == {"info.json", "train.npy", "val.npy", "test.npy", "vocab.json"}
    second = train_flow(config, return_state=True)
    assert CountingHandler.requests_seen == ["/book.txt"]  # nothing downloaded the second time
    now = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "prepared").rglob("*") if p.is_file()}
    assert now == prepared  # nor tokenized again
    assert set(task_states(second).values()) == {"Completed"}


def test_invalid_hyperparameters_are_rejected_before_download(tmp_path, corpus_url, mlflow_store):
    settings = flow_config(tmp_path, corpus_url).model_dump()
    for bad in ({"num_hiddens": 0}, {"lr": -1.0}, {"rnn": "transformer"}, {"batch_size": -2}):
        with pytest.raises(Exception, match="|".join(bad)):
            train_flow(config={**settings, **bad})
    assert CountingHandler.requests_seen == []
    assert MlflowClient(mlflow_store).search_runs(experiment_ids=["0"]) == []


def test_failed_run_is_marked_failed_and_registers_nothing(tmp_path, corpus_url, mlflow_store):
    config = flow_config(tmp_path, corpus_url, lr=1e6, registered_model="never")
    with pytest.raises(Exception, match="diverged at epoch 1"):
        train_flow(config)
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("rnnlm").experiment_id])
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["failure_reason"]
    assert client.search_registered_models(filter_string="name = 'never'") == []


def test_corpus_too_short_fails_before_training(tmp_path, serve_dir, mlflow_store):
    www = tmp_path / "www"
    www.mkdir()
    (www / "tiny.txt").write_text("far too short\n")
    config = flow_config(tmp_path, serve_dir(www) + "/tiny.txt", val_tokens=0)
    with pytest.raises(Exception, match="needed for one minibatch"):
        train_flow(config)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("rnnlm")
    assert client.search_runs([experiment.experiment_id]) == []  # failed before any run was started
