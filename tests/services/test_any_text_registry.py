"""A corpus in non-Latin scripts, written here, through the whole pipeline with characters and with byte-level BPE:
both register with bits per byte of one held-out text, the compare table ranks them by it, the evaluate flow scores
them on another file and logs the scores where the registry reads them, and the BPE model serves and writes in the
script of its prompt."""

from __future__ import annotations

import random

import mlflow
import pytest
import requests
from helpers import resume_settings
from helpers.services import model_server
from mlflow import MlflowClient

from flows.evaluate_flow import evaluate_flow, spread_models
from flows.train_flow import train_flow
from rnnlm.config import TrainConfig
from tasks.evaluate import text_dataset
from tracking.versions import comparison_table, text_scores, versions_of

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

WORDS = {
    "ru": "мир дом книга свет вода земля небо время слово",
    "el": "κόσμος σπίτι βιβλίο φως νερό γη ουρανός χρόνος λόγος",
    "zh": "世界 和平 书 光 水 地 天 时间 语言",
}
SIZE = dict(
    preprocess="raw", held_out="lines", val_tokens=30, test_tokens=30, num_hiddens=32, embedding_dim=32,
    num_epochs=4, batch_size=8, num_steps=16, bpe_vocab_size=400, num_preds=12,
)  # fmt: skip


def write_corpus(path, lines: int, seed: int) -> None:
    """Lines in Russian, Greek and Chinese, each line one script."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = WORDS[("ru", "el", "zh")[i % 3]].split()
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 10))) + ".")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


@pytest.fixture
def registered(tmp_path, mlflow_store):
    """A char and a BPE model of one corpus, registered (versions 1 and 2)."""
    corpus = tmp_path / "scripts.txt"
    write_corpus(corpus, 900, seed=0)
    outs = {
        tokenization: train_flow(TrainConfig(**resume_settings(tmp_path, corpus, tokenization=tokenization, **SIZE)))
        for tokenization in ("char", "bpe")
    }
    return outs, mlflow_store


def test_char_and_bpe_models_of_one_text_rank_by_bits_per_byte_and_evaluate_on_a_file(registered, tmp_path):
    outs, _ = registered
    records = versions_of("rnnlm")
    assert [r["tokenization"] for r in records] == ["char", "bpe"]
    assert records[0]["held_out"] == records[1]["held_out"] and records[0]["held_out"].startswith("bytes ")
    table = comparison_table(records)
    assert sorted(table["rank"]) == [1, 2]
    assert list(table["val_bits_per_byte"]) == sorted(r["val_bits_per_byte"] for r in records)
    assert outs["bpe"]["registered_val_bits_per_byte"] == pytest.approx(records[1]["val_bits_per_byte"])

    text = tmp_path / "new-text.txt"
    write_corpus(text, 60, seed=7)
    out = evaluate_flow(str(text), ["rnnlm/1", "rnnlm/2"], promote_best=True)
    rows = {row["version"]: row for row in out["rows"]}
    assert rows.keys() == {1, 2} and {row["rank"] for row in rows.values()} == {1, 2}
    logged = text_scores(versions_of("rnnlm"), text_dataset(text).digest)  # where the registry reads them
    for number in (1, 2):
        assert logged[number]["text_bits_per_byte"] == pytest.approx(rows[number]["bits_per_byte"], abs=1e-4)
        assert logged[number]["text_perplexity"] == pytest.approx(rows[number]["perplexity"], abs=1e-4)
    best = min(rows.values(), key=lambda row: row["bits_per_byte"])["version"]
    assert int(MlflowClient().get_model_version_by_alias("rnnlm", "champion").version) == best
    other = tmp_path / "other.txt"  # scores on another text are kept apart
    write_corpus(other, 30, seed=8)
    evaluate_flow(str(other), ["rnnlm@champion"])
    assert text_scores(versions_of("rnnlm"), text_dataset(other).digest).keys() == {best}


def test_the_served_bpe_model_writes_in_the_script_of_its_prompt(registered, tmp_path):
    outs, store = registered
    uri = f"models:/rnnlm/{outs['bpe']['version']}"
    prompts = ["мир дом", "世界 和平", "🙂 zebra"]  # the last one in no script of the corpus: still a valid prompt
    with model_server(uri, store, tmp_path / "serve.log") as (url, _):
        body = {"inputs": prompts, "params": {"num_preds": 12, "seed": 0}}
        served = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert served.status_code == 200, served.text
    texts = served.json()["predictions"]
    assert [t[: len(p)] for t, p in zip(texts, prompts, strict=True)] == prompts
    continuation = texts[0][len(prompts[0]) :]
    assert any("\u0400" <= ch <= "\u04ff" for ch in continuation)  # Cyrillic after a Cyrillic prompt
    assert texts == mlflow.pyfunc.load_model(uri).predict(prompts, params={"num_preds": 12, "seed": 0})
    char_model = mlflow.pyfunc.load_model(f"models:/rnnlm/{outs['char']['version']}")
    [greek] = char_model.predict(["κόσμος "], params={"num_preds": 12, "seed": 0})
    assert greek.startswith("κόσμος ") and any("\u0370" <= ch <= "\u03ff" for ch in greek[len("κόσμος ") :])


def test_models_on_the_command_line_take_several_values():
    argv = ["--text", "f.txt", "--models", "rnnlm@champion", "rnnlm/3", "--promote"]
    assert spread_models(argv) == ["--text", "f.txt", "--models", "rnnlm@champion", "--models", "rnnlm/3", "--promote"]
