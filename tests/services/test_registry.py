"""Compare and promote against a real MLflow registry (SQLite), with the real flows under a temporary Prefect server."""

from __future__ import annotations

import csv

import mlflow
import pytest
from helpers import prefect_artifact, registry_config, small_text
from mlflow.tracking import MlflowClient

from flows.compare_flow import compare_flow
from flows.train_flow import train_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def alias_version(client: MlflowClient, alias: str) -> int:
    return int(client.get_model_version_by_alias("rnnlm", alias).version)


def promotion_tag(client: MlflowClient, version: int) -> str:
    return client.get_model_version("rnnlm", str(version)).tags["promotion"]


def prefect_table(key: str) -> list[dict]:
    data = prefect_artifact(key).data
    return data if isinstance(data, list) else __import__("json").loads(data)


def test_train_compare_promote_and_load_champion(tmp_path, small_corpus, mlflow_store):
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    short = train_flow(registry_config(tmp_path, str(small_corpus), num_epochs=1, promote=True))
    assert alias_version(client, "champion") == alias_version(client, "challenger") == short["version"] == 1
    assert promotion_tag(client, 1).startswith("promoted to champion: no champion yet")

    # Better, but not by 90 %: it becomes the challenger only, and its tag says why.
    longer = train_flow(registry_config(tmp_path, str(small_corpus), num_epochs=4, promote=True, promote_margin=0.9))
    assert longer["val_perplexity"] < short["val_perplexity"]
    assert (alias_version(client, "champion"), alias_version(client, "challenger")) == (1, 2)
    assert promotion_tag(client, 2).startswith("not promoted: validation bits per byte")
    assert "margin 90.00%" in promotion_tag(client, 2)

    # The compare flow with the default margin (any improvement) promotes it.
    out = compare_flow(promote_best=True)
    assert out["decision"] == {"champion": 2, "challenger": 2, "promoted": True}
    assert alias_version(client, "champion") == 2
    assert promotion_tag(client, 1).startswith("replaced as champion by v2")
    assert [r["version"] for r in out["records"]] == [1, 2]

    table = prefect_table("registry-comparison")
    assert [row["version"] for row in table] == [2, 1]  # best validation bits per byte first
    assert table[0]["aliases"] == "challenger,champion" and table[0]["epochs"] == "4"
    assert table[0]["val_perplexity"] == pytest.approx(longer["val_perplexity"], abs=1e-4)
    assert {"run_id", "created", "rnn", "num_layers", "num_hiddens", "tokenization", "max_tokens", "lr"} <= set(
        table[0]
    )
    assert table[0]["tokens_per_sec"] > 0 and table[0]["device"].startswith("cpu") and table[0]["engine"]

    [path] = [a.path for a in client.list_artifacts(out["mlflow_run_id"]) if a.path.endswith(".csv")]
    local = client.download_artifacts(out["mlflow_run_id"], path, str(tmp_path))
    with open(local) as f:
        assert [row["version"] for row in csv.DictReader(f)] == ["2", "1"]

    # A version trained on another corpus is never compared with the champion.
    other = tmp_path / "other.txt"
    other.write_text(small_text(seed=7))
    third = train_flow(registry_config(tmp_path, str(other), num_epochs=1, promote=True))
    assert (alias_version(client, "champion"), alias_version(client, "challenger")) == (2, third["version"])
    assert promotion_tag(client, 3).startswith("not compared with champion v2: trained on corpus")

    champion = mlflow.pyfunc.load_model("models:/rnnlm@champion")
    [text] = champion.predict(["time traveller"], params={"num_preds": 30, "temperature": 0.8, "top_k": 5, "seed": 1})
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 30


def test_compare_with_no_registered_model_is_empty(mlflow_store):
    out = compare_flow(registered_model="nothing-here", promote_best=True)
    assert out == {"decision": None, "records": [], "mlflow_run_id": None}
