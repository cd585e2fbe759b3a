"""Corpora of any size: preprocessing, vocabulary and token ids in fixed-size chunks, straight to a memory-mapped file.

The book's character-level pipeline on ASCII bytes runs at C speed with `bytes.translate` and `bytes.replace`; memory
is bounded by the chunk size, not the file. Word tokens and non-ASCII text at character level take a general path
(still chunked, Python-speed). The result equals `prepare_text` + `build_vocab` + `encode` on the whole text.
"""

from __future__ import annotations

import codecs
import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rnnlm.corpus import CorpusError, preprocess_book_bytes
from rnnlm.vocab import Vocab, encode, id_dtype, prepare_text, rank_counts

CHUNK_BYTES = 8 << 20


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The file in pieces of about `chunk_bytes`, each ending at a line break (the last one may not), so that no line
    and no UTF-8 character is cut. Refuses binary files (NUL bytes near the start), as `read_text` does."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(chunk_bytes):
            if not rest and f.tell() == len(block) and b"\x00" in block[: 1 << 20]:
                raise CorpusError(f"{path} looks binary (it contains NUL bytes); give a plain-text corpus")
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one very long line: keep reading
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


def _checked(chunks: Iterator[bytes], path: Path) -> Iterator[bytes]:
    """Pass chunks through, refusing invalid UTF-8 with the byte offset and a conversion hint."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in chunks:
        if not chunk.isascii():
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path} is not valid UTF-8 (byte {offset + err.start:,}); "
                    "convert it first, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
        offset += len(chunk)
        yield chunk


def _prepared_chunks(path: Path, preprocess_mode: str, chunk_bytes: int) -> Iterator[bytes]:
    """Preprocessed UTF-8 text, chunk by chunk (the book's preprocessing is per line, so chunks are independent)."""
    for chunk in _checked(read_chunks(path, chunk_bytes), path):
        yield preprocess_book_bytes(chunk) if preprocess_mode == "book" else chunk


def tokenize_file(
    path: Path,
    out_path: Path,
    preprocess_mode: str = "book",
    tokenization: str = "char",
    min_freq: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[Vocab, np.ndarray]:
    """Preprocess and tokenize `path`, build the book's vocab, and write the ids as a `.npy` at `out_path`.

    Returns the vocab and the ids memory-mapped read-only. Character level on ASCII text is the fast path: one pass
    preprocesses, counts and writes the characters, a second maps them to ids in place. Anything else is correct but
    slower (Python's Counter), and still holds one chunk at a time.
    """
    if tokenization == "char":
        counts = _write_chars(_prepared_chunks(path, preprocess_mode, chunk_bytes), Path(out_path))
        if counts is not None:
            vocab = build_vocab_from_counts(counts, min_freq)
            _chars_to_ids(Path(out_path), vocab)
            return vocab, np.load(out_path, mmap_mode="r")
    return _tokenize_general(path, out_path, preprocess_mode, tokenization, min_freq, chunk_bytes)


def build_vocab_from_counts(counts: dict[str, int], min_freq: int = 0) -> Vocab:
    """The book's vocab from counts given in order of first appearance."""
    return Vocab(rank_counts(counts, min_freq))


# A 1-D .npy header is 128 bytes for any length up to 10**30, so the data can be written before the length is known.
_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _write_chars(chunks: Iterator[bytes], out_path: Path) -> dict[str, int] | None:
    """Write ASCII chunks after a `.npy` header, counting characters in order of first appearance.

    Returns None (and removes the file) as soon as a chunk is not ASCII: that text takes the general path.
    """
    counts, first, total = np.zeros(256, dtype=np.int64), {}, 0
    with open(out_path, "wb") as f:
        f.write(b"\0" * _HEADER_BYTES)
        for chunk in chunks:
            if not chunk.isascii():
                break
            chunk_counts = np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256)
            for byte in np.flatnonzero(chunk_counts).tolist():
                if byte not in first:
                    first[byte] = total + chunk.find(bytes([byte]))
            counts += chunk_counts
            total += len(chunk)
            f.write(chunk)
        else:
            f.seek(0)
            f.write(_npy_header(np.uint8, total))
            return {chr(b): int(counts[b]) for b in sorted(first, key=first.get)}
    out_path.unlink()
    return None


def _chars_to_ids(path: Path, vocab: Vocab) -> None:
    """Map the characters of a `.npy` written by `_write_chars` to vocabulary ids, in place, chunk by chunk."""
    lut = np.zeros(256, dtype=id_dtype(len(vocab)))  # characters not in the vocab stay 0 = <unk>
    if lut.dtype != np.uint8:
        raise ValueError("a character vocabulary over ASCII has at most 129 tokens")
    for i, token in enumerate(vocab.tokens):
        if len(token) == 1 and token.isascii():
            lut[ord(token)] = i
    with open(path, "r+b") as f:
        f.seek(_HEADER_BYTES)
        while block := f.read(CHUNK_BYTES):
            f.seek(-len(block), io.SEEK_CUR)
            f.write(lut[np.frombuffer(block, dtype=np.uint8)].tobytes())


@contextmanager
def _npy_writer(path: Path, dtype: np.dtype, count: int) -> Iterator:
    """A file object positioned after the header of a 1-D `.npy` of `count` items; checks the count at the end."""
    with open(path, "wb") as f:
        f.write(_npy_header(dtype, count))
        start = f.tell()
        yield f
        written = (f.tell() - start) // np.dtype(dtype).itemsize
    if written != count:
        raise RuntimeError(f"wrote {written:,} ids to {path}, expected {count:,} (did the corpus change meanwhile?)")


def _tokenize_general(
    path: Path, out_path: Path, preprocess_mode: str, tokenization: str, min_freq: int, chunk_bytes: int
) -> tuple[Vocab, np.ndarray]:
    """Any tokenization and any UTF-8 text, chunk by chunk: a Counter pass, then an encoding pass."""

    def texts() -> Iterator[str]:
        for chunk in _checked(read_chunks(path, chunk_bytes), path):
            text = chunk.decode("utf-8")
            # word level keeps a space at line breaks (see prepare_text); a chunk ends at a line break
            yield prepare_text(text, preprocess_mode, tokenization) + (" " if tokenization == "word" else "")

    counts: Counter = Counter()
    for text in texts():
        counts.update(text if tokenization == "char" else text.split())
    vocab = build_vocab_from_counts(dict(counts), min_freq)
    with _npy_writer(out_path, id_dtype(len(vocab)), sum(counts.values())) as f:
        for text in texts():
            f.write(encode(text, vocab, tokenization).tobytes())
    return vocab, np.load(out_path, mmap_mode="r")
