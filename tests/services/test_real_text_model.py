"""A word model of real-text shape (embeddings, dropout, tied weights) through the whole pipeline: early stopping
registers the best weights with their own numbers in the registry's tags, and the registered pyfunc loads,
generates the same text twice (dropout off) and serves."""

from __future__ import annotations

import json

import mlflow
import pytest
import requests
from helpers import resume_settings, small_text
from helpers.services import model_server
from mlflow import MlflowClient

from flows.train_flow import train_flow
from rnnlm.config import TrainConfig
from tracking.versions import versions_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Stops early on this corpus (its validation perplexity stops improving by epoch 6 of 30)
WORD_MODEL = dict(
    tokenization="word", preprocess="words", rnn="gru", num_hiddens=32, embedding_dim=32, tie_weights=True,
    dropout=0.3, lr=5.0, grad_clip=0.25, num_epochs=30, early_stopping=2, eval_every=1, val_tokens=500,
    test_tokens=500, num_preds=12,
)  # fmt: skip


@pytest.fixture
def registered(tmp_path, mlflow_store):
    """Train and register the word model; returns (flow output, store URI)."""
    corpus = tmp_path / "words.txt"
    corpus.write_text(small_text(6000))
    out = train_flow(TrainConfig(**resume_settings(tmp_path, corpus, **WORD_MODEL)))
    return out, mlflow_store


def test_early_stopping_registers_the_best_weights_with_their_numbers(registered):
    out, store = registered
    client = MlflowClient(store)
    run = client.get_run(out["run_id"])
    metrics, tags = run.data.metrics, run.data.tags
    assert "early stopping" in tags["stopped"] and out["epochs"] < 30 and tags["registered_weights"] == "best"
    version = client.get_model_version("rnnlm", str(out["version"]))
    assert version.tags["weights"] == "best" and int(version.tags["epoch"]) < out["epochs"]
    assert float(version.tags["val_perplexity"]) == pytest.approx(metrics["final_registered_val_perplexity"])
    assert float(version.tags["val_perplexity"]) == pytest.approx(metrics["final_best_val_perplexity"])
    assert float(version.tags["val_perplexity"]) != pytest.approx(metrics["final_val_perplexity"])  # not the last's
    assert float(version.tags["test_perplexity"]) == pytest.approx(metrics["final_registered_test_perplexity"])
    [record] = versions_of("rnnlm")
    assert record["val_perplexity"] == pytest.approx(metrics["final_registered_val_perplexity"])  # the compare table
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "checkpoint")}
    assert artifacts == {"checkpoint/model.pt", "checkpoint/best.pt"}
    samples = json.loads(mlflow.artifacts.load_text(f"runs:/{out['run_id']}/samples.json"))
    assert {"greedy", "t0.8-top5", "t1.0-all", "best-greedy", "best-t0.8-top5"} <= samples.keys()

    model = mlflow.pyfunc.load_model(f"models:/rnnlm/{out['version']}")
    first = model.predict(["the time traveller", "a machine"], params={"num_preds": 8})
    assert first == model.predict(["the time traveller", "a machine"], params={"num_preds": 8})
    assert [len(text.split()) for text in first] == [11, 10]
    # the registered model is the best weights: its greedy text is the run's best-greedy sample
    prompt = next(iter(samples["best-greedy"]))  # from the held-out text (this corpus is not the book's)
    [greedy] = model.predict([prompt], params={"num_preds": 12})
    assert greedy == samples["best-greedy"][prompt] != samples["greedy"][prompt]


@pytest.mark.slow
def test_the_registered_word_model_serves(registered, tmp_path):
    out, store = registered
    uri = f"models:/rnnlm/{out['version']}"
    in_process = mlflow.pyfunc.load_model(uri).predict(["time traveller"], params={"num_preds": 6, "seed": 3})
    with model_server(uri, store, tmp_path / "serve.log") as (url, _):
        body = {"inputs": ["time traveller"], "params": {"num_preds": 6, "seed": 3}}
        served = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert served.status_code == 200, served.text
        assert served.json()["predictions"] == in_process
        unknown = requests.post(f"{url}/invocations", json={"inputs": ["zebra"]}, timeout=60)
        assert unknown.status_code == 400 and "outside the vocabulary" in unknown.text
