"""BPE models with every model option, and tokenization of held-out spans chunk by chunk."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rnnlm import checkpoint, data
from rnnlm.config import TrainConfig
from rnnlm.generate import sample_many
from rnnlm.run import fit
from rnnlm.spans import held_out_spans, tokenize_spans

WORDS = "мир дом книга свет вода 世界 和平 书 καλημέρα κόσμε 🙂 dog cat".split()


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(1)
    path = tmp_path / "c.txt"
    path.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) + "\n" for _ in range(500)), "utf-8")
    return path


@pytest.mark.parametrize(
    "options",
    [
        {"embedding_dim": 24, "num_hiddens": 24, "tie_weights": True, "adaptive_cutoffs": [40, 150]},
        {"rnn": "gru", "embedding_dim": 0, "num_hiddens": 24},  # one-hot inputs (the book), the CPU engine's case
        {"rnn": "lstm", "embedding_dim": 16, "num_hiddens": 24, "dropout": 0.2},
    ],
)
def test_a_bpe_model_trains_with_any_model_option_and_generates_text(tmp_path, corpus, options):
    config = TrainConfig(
        corpus=str(corpus), preprocess="raw", tokenization="bpe", bpe_vocab_size=300, held_out="lines",
        val_tokens=40, test_tokens=40, max_tokens=-1, batch_size=4, num_steps=12, num_epochs=3, lr=2.0, eval_every=1,
        **options,
    )  # fmt: skip
    result = fit(config, data.prepare_data(corpus, config), tmp_path / "m.pt")
    first, last = result.history[0].train_perplexity, result.history[-1].train_perplexity
    assert last < first  # it learns
    assert math.isfinite(result.registered_val_bits_per_byte) and math.isfinite(result.registered_test_bits_per_byte)
    saved = checkpoint.load_checkpoint(result.registered_checkpoint)  # weights_only: the tokenizer is a string
    assert isinstance(saved["tokenizer"], str) and checkpoint.model_from_checkpoint(saved)[1].tokenizer
    texts = sample_many(result.registered_checkpoint, ["мир", "世界"], 10, {"g": {"top_k": 1}})["g"]
    assert texts["мир"].startswith("мир") and texts["世界"].startswith("世界")


@pytest.mark.parametrize("tokenization", ["char", "word", "bpe"])
def test_spans_tokenize_the_same_in_small_chunks(tmp_path, corpus, tokenization):
    spans = held_out_spans(corpus, "bytes", 2000, 1000)
    whole = tokenize_spans(corpus, tmp_path / "a.npy", spans, "raw", tokenization, bpe_vocab_size=300)
    small = tokenize_spans(corpus, tmp_path / "b.npy", spans, "raw", tokenization, bpe_vocab_size=300, chunk_bytes=97)
    assert whole[0] == small[0] and whole[2] == small[2]
    assert np.array_equal(whole[1], small[1])


def test_bpe_encodes_a_chunk_over_a_megabyte_in_pieces_as_it_would_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(2)
    path = tmp_path / "big.txt"
    path.write_text("".join(" ".join(rng.choices(WORDS, k=8)) + "\n" for _ in range(30_000)), "utf-8")
    assert path.stat().st_size > 1_200_000  # one chunk of 8 MB, encoded in pieces of about 1 MB
    spans = held_out_spans(path, "lines", 100, 100)
    pieces = tokenize_spans(path, tmp_path / "a.npy", spans, "raw", "bpe", bpe_vocab_size=300)
    lines = tokenize_spans(path, tmp_path / "b.npy", spans, "raw", "bpe", bpe_vocab_size=300, chunk_bytes=50_000)
    assert pieces[2] == lines[2] and np.array_equal(pieces[1], lines[1])
