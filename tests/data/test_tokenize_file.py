"""Streaming preprocessing and tokenization: equal to the whole-text path, chunk by chunk, at any chunk size."""

import random
import re

import numpy as np
import pytest
from helpers import small_text

from rnnlm.corpus import CorpusError, preprocess, preprocess_book_bytes, read_chunks
from rnnlm.tokens import build_vocab, encode, prepare_text, tokenize_file


def _book_reference(text: str) -> str:
    """The book's `read_time_machine`, verbatim: a regex per line."""
    return "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n"))


def test_byte_preprocessing_equals_the_books_regex_on_random_text():
    rng = random.Random(0)
    alphabet = "aZq  \n\r\t,.-'é日0"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert preprocess(text) == _book_reference(text), repr(text)
        assert preprocess_book_bytes(text.encode()).decode() == _book_reference(text)


def test_chunks_end_at_line_breaks_and_cover_the_file(tmp_path):
    path = tmp_path / "t.txt"
    data = small_text(500).encode() + b"no newline at the end"
    path.write_bytes(data)
    chunks = list(read_chunks(path, chunk_bytes=100))
    assert b"".join(chunks) == data and len(chunks) > 10
    assert all(c.endswith(b"\n") for c in chunks[:-1])


def _whole_text(path, mode, tokenization):
    text = prepare_text(path.read_text(), mode, tokenization)
    vocab = build_vocab(text, tokenization)
    return vocab, encode(text, vocab, tokenization)


@pytest.mark.parametrize("mode", ["book", "raw"])
@pytest.mark.parametrize("tokenization", ["char", "word"])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_streamed_vocab_and_ids_equal_the_whole_text_path(tmp_path, mode, tokenization, chunk_bytes):
    path = tmp_path / "t.txt"
    path.write_text(small_text(800, seed=3) + "Ünïcode line, déjà vu\n" + small_text(300, seed=4))
    vocab, ids = tokenize_file(path, tmp_path / "ids.npy", mode, tokenization, chunk_bytes=chunk_bytes)
    want_vocab, want_ids = _whole_text(path, mode, tokenization)
    assert vocab == want_vocab
    assert ids.dtype == want_ids.dtype and np.array_equal(ids, want_ids)
    assert isinstance(ids, np.memmap)  # not loaded into memory


def test_real_corpus_streams_to_the_books_vocab(real_corpus, tmp_path):
    vocab, ids = tokenize_file(real_corpus, tmp_path / "ids.npy", chunk_bytes=4096)
    assert len(vocab) == 28 and len(ids) == 170_580 and ids.dtype == np.uint8
    assert vocab.to_tokens(ids[:13]) == list("the time mach")


def test_min_freq_applies_when_streaming(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("aaa bb c\n")
    vocab, ids = tokenize_file(path, tmp_path / "ids.npy", "raw", "char", min_freq=2)
    assert vocab.tokens == ["<unk>", "a", " ", "b"]
    assert ids.tolist() == [1, 1, 1, 2, 3, 3, 2, 0, 0]  # 'c' and the line break are <unk>


def test_streaming_refuses_bad_files(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"line one\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not valid UTF-8 \(byte 12\).*iconv"):
        tokenize_file(latin, tmp_path / "ids.npy")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(CorpusError, match="binary"):
        tokenize_file(binary, tmp_path / "ids.npy")
