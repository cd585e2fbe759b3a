"""Corpus download and reading: a real HTTP server on loopback, verified files, nothing partial in the cache."""

import hashlib
from pathlib import Path

import pytest

from rnnlm.corpus import CorpusError, preprocess, read_text
from rnnlm.download import DownloadError, cache_path_for, fetch_corpus


def _publish(tmp_path: Path, text: str = "The Time Machine, by H. G. Wells.\n") -> tuple[Path, str]:
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "book.txt").write_text(text)
    return folder, hashlib.sha1(text.encode()).hexdigest()


def test_download_verifies_and_caches(tmp_path, serve_dir):
    folder, sha1 = _publish(tmp_path)
    url = serve_dir(folder) + "/book.txt"
    path = fetch_corpus(url, tmp_path / "cache", sha1=sha1)
    assert path == cache_path_for(url, tmp_path / "cache")
    assert path.read_text() == (folder / "book.txt").read_text()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_cached_file_is_reused_without_network(tmp_path, serve_dir):
    folder, sha1 = _publish(tmp_path)
    url = serve_dir(folder) + "/book.txt"
    first = fetch_corpus(url, tmp_path / "cache", sha1=sha1)
    (folder / "book.txt").unlink()  # the server would now answer 404
    assert fetch_corpus(url, tmp_path / "cache", sha1=sha1) == first


def test_sha1_mismatch_leaves_nothing_in_the_cache(tmp_path, serve_dir):
    folder, _ = _publish(tmp_path)
    url = serve_dir(folder) + "/book.txt"
    with pytest.raises(CorpusError, match="sha1 of .* expected 0{40}"):
        fetch_corpus(url, tmp_path / "cache", sha1="0" * 40)
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "corpus"]


def test_unreachable_url_names_the_url_and_the_local_alternative(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/book.txt"
    with pytest.raises(DownloadError) as err:
        fetch_corpus(url, tmp_path / "cache", timeout=(2, 2))
    assert url in str(err.value) and "--corpus /path/to/file" in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_download_over_the_size_limit_stops(tmp_path, serve_dir):
    folder, _ = _publish(tmp_path, "x" * 5000)
    with pytest.raises(CorpusError, match="over the limit"):
        fetch_corpus(serve_dir(folder) + "/book.txt", tmp_path / "cache", max_bytes=1000)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abc")
    assert fetch_corpus(str(path), tmp_path / "cache") == path
    assert fetch_corpus(path.as_uri(), tmp_path / "cache") == path
    with pytest.raises(CorpusError, match="does not exist"):
        fetch_corpus(str(tmp_path / "missing.txt"), tmp_path / "cache")


def test_non_utf8_and_binary_files_are_refused(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8.*iconv"):
        read_text(latin)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(CorpusError, match="binary"):
        read_text(binary)


def test_book_preprocessing():
    raw = "The Time Machine, by H. G. Wells [1898]\n\n\nI\n  The Time Traveller (for so...\n"
    # per line: runs of non-letters -> one space, strip, lowercase; lines joined with nothing between them
    assert preprocess(raw) == "the time machine by h g wells" + "i" + "the time traveller for so"
    assert preprocess(raw, "raw") == raw
