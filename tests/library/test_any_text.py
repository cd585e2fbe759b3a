"""Text in any script: byte-level BPE, held-out text as spans of the corpus, bits per byte, and the registry's
comparison of any two models of the same text."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from rnnlm import bpe, data
from rnnlm.config import TrainConfig
from rnnlm.corpus import CorpusError, preprocess, split_words
from rnnlm.evaluate import bits_per_byte, evaluate_loss, score_file
from rnnlm.generate import generate, prompts_for
from rnnlm.model import build_model
from rnnlm.promotion import Candidate, decide, not_comparable
from rnnlm.run import _bits_per_byte, fit
from rnnlm.tokens import ids_text
from tracking.versions import comparison_table

MIXED = [
    "Привет, мир! Как дела?",
    "天下大势，分久必合，合久必分。",
    "Καλημέρα κόσμε 🙂🚀 👩‍👩‍👧",
    "mixed: naïve café, Ελλάδα, 東京, नमस्ते, עברית, العربية\ttab\r\n",
    "",
    "\n\n  spaces  \n",
]


def corpus_text(lines: int = 400, seed: int = 0) -> str:
    """A made-up corpus in several scripts, one sentence a line."""
    rng = random.Random(seed)
    words = ["привет", "мир", "книга", "世界", "和平", "καλημέρα", "κόσμε", "🙂", "नमस्ते", "дом", "日本語"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + ".\n" for _ in range(lines))


def config_for(corpus, tokenization: str, **overrides) -> TrainConfig:
    settings = dict(
        corpus=str(corpus), preprocess="raw", tokenization=tokenization, held_out="lines", val_tokens=40,
        test_tokens=40, max_tokens=-1, batch_size=2, num_steps=8, bpe_vocab_size=300, num_hiddens=16, num_epochs=1,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "multi.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def held_out_text(prepared: data.PreparedData, tokenization: str, split: str = "val") -> str:
    vocab = data.Vocab.load(prepared.vocab_path)
    ids = np.load(prepared.val_path if split == "val" else prepared.test_path)
    return ids_text(ids.tolist(), vocab, tokenization)


# --- byte-level BPE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED + ["Ünïcödé \u0301 combining; 🏳️‍🌈 flags; \x00\x7f control"])
def test_bpe_round_trips_any_utf8_text_exactly(text):
    tokenizer = bpe.train(MIXED[:2], vocab_size=300)  # texts in other scripts than it learned from too
    ids = bpe.encode(tokenizer, text)
    assert bpe.decode(tokenizer, ids) == text
    assert 0 not in ids  # no <unk>, ever
    assert bpe.token_bytes(bpe.vocab_of(tokenizer))[ids].sum() == len(text.encode("utf-8"))


def test_bpe_vocabulary_travels_as_json(tmp_path):
    vocab = bpe.vocab_of(bpe.train(MIXED, vocab_size=300))
    vocab.save(tmp_path / "vocab.json")
    again = data.Vocab.load(tmp_path / "vocab.json")
    assert again == vocab and again.tokens[0] == "<unk>"
    assert ids_text(bpe.encode(again.bpe, MIXED[1]), again, "bpe") == MIXED[1]


def test_bpe_tokenizer_learns_from_the_training_span_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    secret = "зюзюкало"  # a word of the held-out lines only, repeated: any tokenizer that saw it would merge it
    path = tmp_path / "c.txt"
    path.write_text(corpus_text(300) + "".join(f"{secret} {secret} {secret}.\n" for _ in range(80)), encoding="utf-8")
    prepared = data.prepare_data(path, config_for(path, "bpe", val_tokens=40, test_tokens=40, bpe_vocab_size=600))
    vocab = data.Vocab.load(prepared.vocab_path)

    def pieces_of_secret(vocab) -> list[str]:
        learned = (bpe.decode(vocab.bpe, [i]).strip() for i in range(1, len(vocab)))
        return [t for t in learned if len(t) > 2 and t in secret]

    assert pieces_of_secret(vocab) == []
    assert held_out_text(prepared, "bpe").count(secret) == 120  # the held-out text still holds it, exactly
    whole = bpe.vocab_of(bpe.train([path.read_text(encoding="utf-8")], 600))  # the same trainer on all the text
    assert pieces_of_secret(whole)


def test_bpe_needs_held_out_text_not_tokens():
    with pytest.raises(ValueError, match="--held_out bytes"):
        TrainConfig(tokenization="bpe")
    assert TrainConfig(tokenization="bpe", held_out="bytes").bpe_vocab_size == 2000


def test_bpe_model_generates_in_the_script_of_its_prompt(corpus):
    prepared = data.prepare_data(corpus, config_for(corpus, "bpe"))
    vocab = data.Vocab.load(prepared.vocab_path)
    torch.manual_seed(0)
    model = build_model(config_for(corpus, "bpe", embedding_dim=16, tie_weights=True), len(vocab))
    texts = generate(model, vocab, ["Привет, 世界"], 20, "bpe", temperature=1.0, top_k=5, seed=0)
    assert texts[0].startswith("Привет, 世界") and len(texts[0]) > len("Привет, 世界")


# --- every language ---------------------------------------------------------------------------------------------


def test_raw_and_words_take_any_script_nfc_normalised():
    decomposed = "Cafe\u0301 Ελλα\u0301δα"
    assert preprocess(decomposed, "raw") == "Café Ελλάδα"
    assert preprocess(decomposed, "words") == "café ελλάδα"
    words = ["привет", ",", "мир", "!", "天", "下", "大", "势", "。", "नमस्ते"]
    assert split_words("Привет, мир! 天下大势。नमस्ते") == words
    assert preprocess("Привет", "book") == ""  # the book's preprocessing stays the book's: ASCII letters only


# --- the same held-out text whatever the tokenization ----------------------------------------------------------


@pytest.mark.parametrize("unit", ["lines", "bytes"])
def test_runs_of_one_corpus_hold_out_byte_identical_text(corpus, unit):
    sizes = {"val_tokens": 40, "test_tokens": 30} if unit == "lines" else {"val_tokens": 1500, "test_tokens": 900}
    runs = {
        t: data.prepare_data(corpus, config_for(corpus, t, held_out=unit, **sizes))
        for t in ("char", "bpe", "word")
    }
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    for split in ("val", "test"):
        char, sub = held_out_text(runs["char"], "char", split), held_out_text(runs["bpe"], "bpe", split)
        assert char == sub and char.endswith(".\n")
        assert held_out_text(runs["word"], "word", split).split() == char.split()
        assert {getattr(p, f"{split}_bytes") for p in runs.values()} == {len(char.encode("utf-8"))}
    if unit == "lines":
        assert held_out_text(runs["char"], "char", "test") == "".join(lines[-30:])
        assert held_out_text(runs["char"], "char", "val") == "".join(lines[-70:-30])
    assert len({p.held_out_span for p in runs.values()}) == 1
    assert len(held_out_text(runs["char"], "char", "test").encode("utf-8")) >= sizes["test_tokens"]


# --- bits per byte -----------------------------------------------------------------------------------------------


def test_bits_per_byte_of_a_char_model_is_bits_per_char_times_chars_per_byte(corpus):
    cfg = config_for(corpus, "char")
    prepared = data.prepare_data(corpus, cfg)
    vocab, _, val = prepared.load()
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab))
    loss = evaluate_loss(model, torch.from_numpy(np.array(val)), 2, 8)
    text = "".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[-80:-40])
    chars, size = len(text), len(text.encode("utf-8"))
    assert size > 1.5 * chars  # the text is mostly multi-byte characters
    assert _bits_per_byte(loss, len(val), prepared, "val") == pytest.approx(loss / math.log(2) * chars / size)


@pytest.mark.parametrize("held_out, count", [("lines", 2), ("tokens", 6)])
def test_a_word_models_unknown_words_pay_their_spelling(tmp_path, monkeypatch, held_out, count):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "w.txt"
    path.write_text(corpus_text(300) + "мир редкослово дом.\n世界 唯一 和平.\n", encoding="utf-8")
    settings = {"min_freq": 2, "held_out": held_out, "val_tokens": count, "test_tokens": 0}
    prepared = data.prepare_data(path, config_for(path, "word", **settings))
    unknown = ["редкослово", "唯一"]  # seen once in the whole corpus: below min_freq, so <unk>
    assert prepared.val_unk_bytes == sum(len(w.encode("utf-8")) for w in unknown)
    free = bits_per_byte(2.0, prepared.val_tokens, prepared.val_bytes)
    paid = _bits_per_byte(2.0, prepared.val_tokens, prepared, "val")
    assert paid == pytest.approx(free + 8 * prepared.val_unk_bytes / prepared.val_bytes) and paid > free


def test_held_out_bytes_in_tokens_mode_count_the_held_out_text(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "t.txt"
    path.write_text(corpus_text(200), encoding="utf-8")
    prepared = data.prepare_data(path, config_for(path, "char", held_out="tokens", val_tokens=300, test_tokens=200))
    text = path.read_text(encoding="utf-8")
    assert prepared.test_bytes == len(text[-200:].encode("utf-8"))
    assert prepared.val_bytes == len(text[-500:-200].encode("utf-8"))
    assert prepared.held_out_span == "tokens char 300+200"
    words = data.prepare_data(path, config_for(path, "word", held_out="tokens", val_tokens=30, test_tokens=20))
    tail = text.split()
    assert words.test_bytes == sum(len(w.encode("utf-8")) + 1 for w in tail[-20:])  # a word and its space
    assert words.val_bytes == sum(len(w.encode("utf-8")) + 1 for w in tail[-50:-20])
    rare_config = config_for(path, "word", held_out="tokens", val_tokens=30, test_tokens=20, min_freq=2)
    rare = data.prepare_data(path, rare_config)
    assert (rare.val_bytes, rare.test_bytes) == (words.val_bytes, words.test_bytes)  # the same text, read again


def test_prompts_come_from_the_held_out_text(corpus):
    prepared = data.prepare_data(corpus, config_for(corpus, "char"))
    prompts = prompts_for(prepared, "char")
    assert len(prompts) == 2 and all(p and p in held_out_text(prepared, "char") for p in prompts)


# --- the registry compares any two models of the same text ------------------------------------------------------


def version(number, tokenization, bits, held_out="bytes 10-20-30", sha1="abc", perplexity=5.0) -> Candidate:
    return Candidate(number, perplexity, sha1, "raw", tokenization, bits, held_out)


def test_promotion_ranks_a_char_and_a_bpe_version_of_one_text_by_bits_per_byte():
    char, sub = version(1, "char", 1.30, perplexity=2.4), version(2, "bpe", 1.10, perplexity=30.0)
    decision = decide([char, sub], champion=1)
    assert decision.champion == 2 and "validation bits per byte 1.1000" in decision.reasons[2]
    other = version(3, "bpe", 0.5, held_out="bytes 10-25-30")
    assert decide([char, other], champion=1).champion == 1
    assert "other held-out text" in not_comparable(other, char)


def record(number, tokenization, bits, held_out="bytes 10-20-30", aliases="", sha1="abc") -> dict:
    return {
        "version": number, "val_perplexity": {"char": 2.5, "bpe": 40.0}[tokenization], "val_bits_per_byte": bits,
        "tokenization": tokenization, "held_out": held_out, "aliases": aliases, "corpus_sha1": sha1,
        "preprocess": "raw",
    }  # fmt: skip


def test_compare_table_ranks_by_bits_per_byte_and_refuses_other_held_out_text():
    records = [
        record(1, "char", 1.20, aliases="champion"),
        record(2, "bpe", 1.05),
        record(3, "bpe", 0.40, held_out="bytes 0-15-30"),
        record(4, "char", 0.30, sha1="zzz"),
    ]
    table = comparison_table(records)
    assert list(table["version"][:2]) == [2, 1] and list(table["rank"][:2]) == [1, 2]
    unranked = table.set_index("version").loc[[3, 4]]
    assert unranked["rank"].isna().all()
    assert "other held-out text (bytes 0-15-30 vs bytes 10-20-30)" in unranked.loc[3, "not_ranked"]
    assert "other corpora" in unranked.loc[4, "not_ranked"]


def test_text_that_is_not_utf8_is_refused_by_spans_and_scoring(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "latin1.txt"
    path.write_bytes(corpus_text(200).encode("utf-8") + "señor año\n".encode("latin-1") * 50)
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        data.prepare_data(path, config_for(path, "bpe"))
    good = tmp_path / "good.txt"
    good.write_text(corpus_text(300), encoding="utf-8")
    cfg = config_for(good, "char", num_epochs=1)
    result = fit(cfg, data.prepare_data(good, cfg), tmp_path / "m.pt")
    assert score_file(result.registered_checkpoint, good).bytes == good.stat().st_size
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        score_file(result.registered_checkpoint, path)
