"""A corpus on disk: verified, read as UTF-8 text in chunks, and preprocessed (the book's way, raw, or words).

Downloading a corpus that is a URL is `rnnlm.download`'s job; this module reads what is on disk.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

CHUNK = 1 << 20
TEXT_CHUNK = 8 << 20  # the pieces a corpus is read in


class CorpusError(ValueError):
    """A corpus could not be obtained or read; the message says what to do."""


def sha1_of(path: Path) -> str:
    """Hex sha1 of a file, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(source: str) -> bool:
    """True for http(s) URLs, which are downloaded; file:// URLs and plain paths are read in place."""
    return urlparse(source).scheme.lower() in ("http", "https")


def local_path(source: str) -> Path:
    """The filesystem path of a `file://` URL or a plain path."""
    parsed = urlparse(source)
    if parsed.scheme.lower() == "file":
        return Path(unquote(parsed.path))
    return Path(source).expanduser()


def check_local(source: str) -> Path:
    """The path of a local corpus (a plain path or a file:// URL), once it is known to be a readable file; raises
    CorpusError saying what it is instead and what to give. A no-op in cost: nothing is read."""
    path = local_path(source)
    if path.is_dir():
        raise CorpusError(f"corpus {str(path)!r} is a folder; give the path of a text file (or an http(s) URL)")
    if not path.exists():
        raise CorpusError(f"corpus file {str(path)!r} does not exist; give an existing path or an http(s) URL")
    if not path.is_file():
        raise CorpusError(f"corpus {str(path)!r} is not a regular file; give the path of a text file")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"corpus file {str(path)!r} cannot be read (permission denied); check its permissions")
    return path


def read_text(path: Path) -> str:
    """Read a corpus as UTF-8, refusing binary files and undecodable bytes with a message saying where."""
    return b"".join(read_chunks(path)).decode("utf-8")


def read_chunks(path: Path, chunk_bytes: int = TEXT_CHUNK) -> Iterator[bytes]:
    """The file in pieces of about `chunk_bytes`, each ending at a line break (the last one may not), so that no line
    and no UTF-8 character is cut. Refuses binary files (NUL bytes near the start) and invalid UTF-8, saying where
    and what to do, before yielding the piece that holds it."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in _line_chunks(path, chunk_bytes):
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


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The raw file in pieces of about `chunk_bytes` that end at line breaks; a file with NUL bytes near its start
    is refused as binary."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(chunk_bytes):
            if f.tell() == len(block) and b"\x00" in block[:CHUNK]:
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


# The book's preprocessing as one byte translation: letters lowercased, a line break marked by \x01 (which no other
# byte maps to), every other byte (punctuation, digits, whitespace, each byte of a non-ASCII character) a space.
_BOOK_TABLE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 else 1 if c == 10 else 32 for c in range(256))


def preprocess(text: str, mode: str = "book") -> str:
    """Normalise raw text. 'book' is D2L's `read_time_machine`: per line, runs of non-letters become one space, the
    line is stripped and lowercased, and the lines are joined with nothing between them. 'words' is for real text
    at word level: lowercased, each punctuation mark split off as its own token, tokens and lines joined by one
    space (see `split_words`). 'raw' returns the text. Both 'words' and 'raw' take text of any script, NFC-normalised
    (a letter and its accent typed apart or together are one character)."""
    if mode == "raw":
        return text if text.isascii() else unicodedata.normalize("NFC", text)
    if mode == "words":
        text = text if text.isascii() else unicodedata.normalize("NFC", text)
        return " ".join(" ".join(split_words(line)) for line in text.split("\n") if line.strip())
    if mode != "book":
        raise ValueError(f"unknown preprocess mode {mode!r}; use 'book', 'words' or 'raw'")
    return preprocess_book_bytes(text.encode("utf-8")).decode("ascii")


# Scripts written without spaces between words (CJK ideographs, kana): each character is a word of its own
_NO_SPACES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"


@functools.cache
def _word_pattern() -> re.Pattern:
    """A word (letters and digits, with their combining marks, e.g. Devanagari's vowel signs, and inner apostrophes
    or hyphens: "don't", "well-known"), one character of a script without spaces, or one other visible character."""
    marks = "".join(chr(c) for c in range(0x300, 0x10000) if unicodedata.category(chr(c))[0] == "M")
    letter = f"(?:[^\\W_{_NO_SPACES}]|[{re.escape(marks)}])"
    return re.compile(f"{letter}+(?:['’-]{letter}+)*|[{_NO_SPACES}]|[^\\w\\s]|_")


def split_words(line: str) -> list[str]:
    """One line of text as lowercased words and punctuation marks; in CJK scripts, one word a character.

    "Then, he said: 'Go!'" -> then , he said : ' go ! '
    """
    return _word_pattern().findall(line.lower())


def preprocess_book_bytes(data: bytes) -> bytes:
    """The book's preprocessing on UTF-8 bytes, at C speed (a translation and a few vectorised passes, no per-line
    Python).

    Equal to `"".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n"))`: a non-ASCII
    character is a non-letter for that regex, and all of its UTF-8 bytes are non-letters here.
    """
    chars = np.frombuffer(data.translate(_BOOK_TABLE), dtype=np.uint8)
    space = chars == 32
    repeat = space.copy()
    repeat[1:] &= space[:-1]
    chars = chars[~repeat]  # every run of spaces is now one space
    letter = chars > 32
    drop = ~letter  # line marks go (the lines are joined with nothing) and so do spaces...
    drop[1:-1] &= ~(letter[:-2] & letter[2:]) | (chars[1:-1] == 1)  # ...except a space between two letters
    return chars[~drop].tobytes()
