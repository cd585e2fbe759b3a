"""Fixtures of the speed-path tests: a small character corpus as token ids, and the compiled LSTM chosen."""

from __future__ import annotations

import pytest
from helpers import small_text

from rnnlm.batches import as_tensor
from rnnlm.tokens import build_vocab, encode, prepare_text


@pytest.fixture(scope="module")
def char_ids():
    """char_ids(words) -> (vocabulary size, the ids of a made-up text of `words` words at character level)."""

    def make(words: int):
        text = prepare_text(small_text(words), "book", "char")
        vocab = build_vocab(text, "char")
        return len(vocab), as_tensor(encode(text, vocab, "char"))

    return make


@pytest.fixture(autouse=True)
def _compiled_lstm(monkeypatch):
    """The compiled LSTM, whatever this machine measures (tests of the engine's LSTM need it; tests of the choice
    itself set their own)."""
    monkeypatch.setenv("RNNLM_CPU_CHOICE", "lstm-step=compiled")
