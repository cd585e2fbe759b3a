"""Held-out text as spans of the raw corpus file, and what a held-out split holds in bytes.

With `held_out = "bytes"` or `"lines"`, validation and test are the last lines of the corpus file (test the very
last), cut at line boundaries and measured in the file's own bytes or lines, before any preprocessing or
tokenization. Runs of one corpus and preprocessing then hold out byte-identical text whatever their tokenization,
and their bits per byte compare. Each span is prepared and tokenized on its own (`tokenize_spans`), so that no token
straddles two spans; a BPE tokenizer learns from the training span only.

With `held_out = "tokens"` (the book) the held-out text is the last tokens of the prepared corpus; `tail_tokens`
finds their text, for its bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlm.batches import DataError
from rnnlm.corpus import CHUNK, TEXT_CHUNK, read_chunks
from rnnlm.tokens import Vocab, count_tokens, encode, id_dtype, prepared_texts, rank_counts, split_tokens


@dataclass(frozen=True)
class Spans:
    """Byte offsets in the corpus file: training before `val_start`, validation up to `test_start`, test to `end`."""

    val_start: int
    test_start: int
    end: int

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of the training, validation and test spans."""
        return [(0, self.val_start), (self.val_start, self.test_start), (self.test_start, self.end)]

    def key(self) -> str:
        """The held-out text's identity within its corpus, for comparing runs: its byte offsets."""
        return f"bytes {self.val_start}-{self.test_start}-{self.end}"


def held_out_spans(path: Path, unit: str, val: int, test: int) -> Spans:
    """Test: the last lines of `path` holding at least `test` bytes (unit 'bytes') or exactly `test` lines (unit
    'lines'); validation: the lines before them, likewise. DataError when nothing is left to train on."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        test_start = _cut(f, size, test, unit)
        val_start = _cut(f, test_start, val, unit)
    if val_start == 0 and (val or test):
        raise DataError(
            f"holding out {val:,} + {test:,} {unit} leaves nothing to train on in {path} ({size:,} bytes); "
            "hold out fewer"
        )
    return Spans(val_start, test_start, size)


def _cut(f, end: int, amount: int, unit: str) -> int:
    """The start of the last lines before `end` that hold at least `amount` bytes, or `amount` lines."""
    if amount == 0 or end == 0:
        return end
    if unit == "bytes":
        target = end - amount
        if target <= 0:
            return 0
        return next((i + 1 for i in _newlines_before(f, target)), 0)
    f.seek(end - 1)
    last = end - 1 if end and f.read(1) == b"\n" else end  # the newline that ends the last line is not a cut
    for count, i in enumerate(_newlines_before(f, last), start=1):
        if count == amount:
            return i + 1
    return 0


def _newlines_before(f, before: int) -> Iterator[int]:
    """Offsets of the newlines in the file before offset `before`, nearest first, read in blocks from there back."""
    stop = before
    while stop > 0:
        start = max(0, stop - CHUNK)
        f.seek(start)
        block = f.read(stop - start)
        i = block.rfind(b"\n")
        while i >= 0:
            yield start + i
            i = block.rfind(b"\n", 0, i)
        stop = start


def span_chunks(path: Path, start: int, end: int, chunk_bytes: int = TEXT_CHUNK) -> Iterator[bytes]:
    """The bytes of `path` from `start` to `end` (line boundaries), in `read_chunks`' pieces (checked the same way)."""
    offset = 0
    for chunk in read_chunks(path, chunk_bytes):
        lo, hi = max(start - offset, 0), min(end - offset, len(chunk))
        if lo < hi:
            yield chunk[lo:hi]
        offset += len(chunk)
        if offset >= end:
            return


def tokenize_spans(
    path: Path,
    out_path: Path,
    spans: Spans,
    preprocess_mode: str,
    tokenization: str,
    min_freq: int = 0,
    bpe_vocab_size: int = 0,
    chunk_bytes: int = TEXT_CHUNK,
) -> tuple[Vocab, np.ndarray, tuple[int, int, int]]:
    """Prepare and tokenize each span of `path` on its own into one `.npy` of ids at `out_path` (training, then
    validation, then test tokens); returns the vocab, the ids memory-mapped and each span's token count.

    Characters and words take the book's vocabulary over the whole corpus (as `tokenize_file` does); a BPE tokenizer
    is trained on the training span only. Memory is bounded by a chunk: the ids go to disk as they come.
    """

    def texts(start: int, end: int) -> Iterator[str]:
        return prepared_texts(span_chunks(path, start, end, chunk_bytes), preprocess_mode, tokenization)

    if tokenization == "bpe":
        from rnnlm import bpe

        vocab = bpe.vocab_of(bpe.train(texts(0, spans.val_start), bpe_vocab_size))
    else:
        vocab = Vocab(rank_counts(dict(count_tokens(texts(0, spans.end), tokenization)), min_freq))
    dtype, counts, raw = id_dtype(len(vocab)), [], Path(out_path).with_name(Path(out_path).name + ".ids")
    try:
        with open(raw, "wb") as f:
            for start, end in spans.bounds():
                count = 0
                for ids in span_ids(path, start, end, preprocess_mode, tokenization, vocab, chunk_bytes):
                    f.write(ids.tobytes())
                    count += len(ids)
                counts.append(count)
        _raw_to_npy(raw, Path(out_path), dtype, sum(counts))
    finally:
        raw.unlink(missing_ok=True)
    return vocab, np.load(out_path, mmap_mode="r"), tuple(counts)


def span_ids(
    path: Path,
    start: int,
    end: int,
    preprocess_mode: str,
    tokenization: str,
    vocab: Vocab,
    chunk_bytes: int = TEXT_CHUNK,
) -> Iterator[np.ndarray]:
    """The ids of a span of `path` (start to end, line boundaries), prepared and tokenized chunk by chunk."""
    texts = prepared_texts(span_chunks(path, start, end, chunk_bytes), preprocess_mode, tokenization)
    for text in texts:
        yield _encode_piecewise(text, vocab, tokenization).astype(id_dtype(len(vocab)), copy=False)


def _encode_piecewise(text: str, vocab: Vocab, tokenization: str) -> np.ndarray:
    """`encode` of a prepared chunk; BPE in pieces of about 1 MB cut after line breaks (memory stays small)."""
    if tokenization != "bpe" or len(text) <= CHUNK:
        return encode(text, vocab, tokenization)
    from rnnlm import bpe

    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + CHUNK) + 1 or len(text)
        pieces.append(text[start:cut])
        start = cut
    return np.asarray([i for ids in bpe.encode_batch(vocab.bpe, pieces) for i in ids], dtype=id_dtype(len(vocab)))


def _raw_to_npy(raw: Path, out_path: Path, dtype: np.dtype, total: int) -> None:
    """Copy a file of raw ids into a `.npy` of `total` ids, block by block."""
    ids = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(total,))
    if total:
        source = np.memmap(raw, dtype=dtype, mode="r")
        for start in range(0, total, TEXT_CHUNK):
            ids[start : start + TEXT_CHUNK] = source[start : start + TEXT_CHUNK]
        del source
    ids.flush()
    del ids


# --- bytes of held-out text -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutBytes:
    """A held-out split's UTF-8 bytes as the model sees it after preprocessing, and the bytes of its tokens that the
    vocabulary maps to `<unk>` (each pays for spelling its text: see `rnnlm.evaluate.bits_per_byte`)."""

    num_bytes: int = 0
    unk_bytes: int = 0


def span_bytes(path: Path, start: int, end: int, preprocess_mode: str, tokenization: str, vocab: Vocab) -> HeldOutBytes:
    """The bytes of a span of the corpus after preprocessing (its character-level form, the same for every
    tokenization) and of its tokens outside `vocab`."""
    chunks = lambda: span_chunks(path, start, end)  # noqa: E731  (read twice, streamed each time)
    num_bytes = sum(len(text.encode("utf-8")) for text in prepared_texts(chunks(), preprocess_mode, "char"))
    if tokenization == "bpe":
        return HeldOutBytes(num_bytes, 0)
    texts = prepared_texts(chunks(), preprocess_mode, tokenization)
    unk = sum(_unknown_bytes(split_tokens(text, tokenization), vocab) for text in texts)
    return HeldOutBytes(num_bytes, unk)


def tail_tokens(path: Path, preprocess_mode: str, tokenization: str, count: int) -> list[str]:
    """The last `count` character or word tokens of the prepared corpus (streamed; only those are kept)."""
    tail: deque[str] = deque(maxlen=count)
    for text in prepared_texts(read_chunks(path), preprocess_mode, tokenization):
        tail.extend(split_tokens(text, tokenization)[-count:] if count else ())
    return list(tail)


def token_bytes(tokens: list[str], vocab: Vocab, tokenization: str) -> HeldOutBytes:
    """The bytes of held-out tokens as the model sees them (words with one space each between them) and of those
    outside `vocab`."""
    num_bytes = sum(len(token.encode("utf-8")) for token in tokens)
    return HeldOutBytes(num_bytes + (len(tokens) if tokenization == "word" else 0), _unknown_bytes(tokens, vocab))


def _unknown_bytes(tokens: list[str], vocab: Vocab) -> int:
    return sum(len(token.encode("utf-8")) for token in tokens if token not in vocab.index)
