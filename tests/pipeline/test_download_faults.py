"""Download faults against real HTTP servers on 127.0.0.1: the cache never holds a partial or wrong file."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rnnlm.config import TrainConfig
from rnnlm.corpus import CorpusError
from rnnlm.data import fetch
from rnnlm.download import DownloadError, _check_redirect, fetch_corpus

BODY = b"The Time Machine, by H. G. Wells.\n" * 300


class Handler(BaseHTTPRequestHandler):
    """Answers by the `mode` of its server: 'flaky' (500 twice, then the file), 'truncate', 'endless', '404', 'gzip'
    (the file compressed whatever the client asks), 'trickle' (a byte at a time, for as long as the client reads),
    'redirect' (302 to the server's `location`); else the file."""

    def do_GET(self) -> None:
        server = self.server
        server.hits += 1
        server.encodings.append(self.headers.get("Accept-Encoding"))
        if server.mode == "gzip":
            body = gzip.compress(BODY)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif server.mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            try:
                for byte in BODY:  # about 10,000 bytes at 20 ms each: minutes, if the client never gave up
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass  # the client gave up, as it should
        elif server.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif server.mode == "flaky" and server.hits <= 2:
            self.send_error(500, "try again later")
        elif server.mode == "404":
            self.send_error(404)
        elif server.mode == "truncate":  # promise the whole body, send a third, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 3])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif server.mode == "endless":  # no Content-Length: the size limit must stop the client
            self.send_response(200)
            self.end_headers()
            try:
                while server.sent < 50 * 2**20:
                    self.wfile.write(b"x" * 65536)
                    server.sent += 65536
            except OSError:
                pass  # the client gave up, as it should
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator:
    """Start a real HTTP server on 127.0.0.1 in a given mode; yields `start(mode) -> (server, url)`."""
    servers = []

    def start(mode: str):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.mode, httpd.hits, httpd.sent, httpd.encodings = mode, 0, 0, []
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/book.txt"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/book.txt"
    listener.close()


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_connection_closed_mid_body_is_a_retriable_error_and_leaves_nothing(tmp_path, server):
    _, url = server("truncate")
    with pytest.raises(DownloadError, match=url):
        fetch_corpus(url, tmp_path / "cache", timeout=(5, 5))
    assert files_in(tmp_path / "cache") == []


def test_never_answering_server_times_out_with_a_clear_error(tmp_path, silent_server):
    config = TrainConfig(corpus=silent_server, cache_dir=str(tmp_path / "cache"), download_timeout=1)
    with pytest.raises(DownloadError, match="timed out") as err:
        fetch(config)
    assert silent_server in str(err.value) and "--corpus /path/to/file" in str(err.value)
    assert files_in(tmp_path / "cache") == []


def test_body_without_length_stops_at_the_size_limit(tmp_path, server):
    httpd, url = server("endless")
    with pytest.raises(CorpusError, match="more than 1,048,576 bytes.*--max_download_mb"):
        fetch_corpus(url, tmp_path / "cache", max_bytes=2**20)
    assert files_in(tmp_path / "cache") == []
    assert httpd.sent < 50 * 2**20  # the client hung up; the server did not get to send all it wanted


def test_client_errors_are_not_retried(tmp_path, server):
    _, url = server("404")
    with pytest.raises(CorpusError, match="answered 404.*check the URL"):
        fetch_corpus(url, tmp_path / "cache")


def test_wrong_bytes_for_the_checksum_leave_nothing_in_the_cache(tmp_path, server):
    _, url = server("ok")
    wrong = hashlib.sha1(b"another book").hexdigest()
    with pytest.raises(CorpusError, match=f"expected {wrong}"):
        fetch_corpus(url, tmp_path / "cache", sha1=wrong)
    assert files_in(tmp_path / "cache") == []
    right = hashlib.sha1(BODY).hexdigest()
    assert fetch_corpus(url, tmp_path / "cache", sha1=right).read_bytes() == BODY


@pytest.mark.usefixtures("prefect_harness")
def test_server_errors_are_retried_by_the_task_until_the_file_comes(tmp_path, server):
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from tasks.data import fetch_corpus as fetch_task

    httpd, url = server("flaky")
    config = TrainConfig(corpus=url, corpus_sha1=hashlib.sha1(BODY).hexdigest(), cache_dir=str(tmp_path / "cache"))
    with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):  # the task alone, no flow run
        path = Path(fetch_task(config))
    assert httpd.hits == 3  # 500, 500, then the file
    assert path.read_bytes() == BODY
    assert [p.name for p in files_in(tmp_path / "cache") if p.parent.name == "corpus"] == [path.name]


# --- what real servers do ------------------------------------------------------------------------------------------


def test_a_server_that_gzips_anyway_is_decoded_and_checked_against_its_length(tmp_path, server):
    httpd, url = server("gzip")
    path = fetch_corpus(url, tmp_path / "cache", sha1=hashlib.sha1(BODY).hexdigest(), timeout=(5, 5))
    assert path.read_bytes() == BODY  # the text, not its gzip: the Content-Length (compressed) matched the wire
    assert httpd.hits == 1 and httpd.encodings == ["identity"]  # asked for the body as is, and not retried


def test_a_body_trickling_in_ends_at_the_overall_deadline(tmp_path, server):
    httpd, url = server("trickle")
    config = TrainConfig(corpus=url, cache_dir=str(tmp_path / "cache"), download_timeout=5, download_deadline=0.3)
    with pytest.raises(CorpusError, match=r"took longer than 0\.3 s .*--download_deadline"):
        fetch(config)  # each byte comes well within the 5 s read timeout: only the deadline can stop it
    assert files_in(tmp_path / "cache") == [] and httpd.hits == 1


def test_a_redirect_on_the_same_host_is_followed(tmp_path, server):
    _, target = server("ok")
    httpd, url = server("redirect")
    httpd.location = target
    assert fetch_corpus(url, tmp_path / "cache").read_bytes() == BODY


def test_a_redirect_to_another_host_needs_a_checksum(tmp_path, server):
    other, target = server("ok")
    httpd, url = server("redirect")
    httpd.location = target.replace("127.0.0.1", "localhost")  # the same machine under another host name
    with pytest.raises(CorpusError, match=f"redirects to another host \\({httpd.location}\\).*--corpus_sha1"):
        fetch_corpus(url, tmp_path / "cache")
    assert other.hits == 0 and files_in(tmp_path / "cache") == []  # refused before asking the other host
    path = fetch_corpus(url, tmp_path / "cache", sha1=hashlib.sha1(BODY).hexdigest())  # verified: followed
    assert path.read_bytes() == BODY and other.hits == 1


def test_a_redirect_to_another_scheme_is_refused(tmp_path, server):
    httpd, url = server("redirect")
    httpd.location = "ftp://127.0.0.1/book.txt"
    with pytest.raises(CorpusError, match="redirects from http:// to ftp://127.0.0.1/book.txt; refused"):
        fetch_corpus(url, tmp_path / "cache", sha1=hashlib.sha1(BODY).hexdigest())
    assert files_in(tmp_path / "cache") == []


def test_https_never_redirects_down_to_http_even_with_a_checksum():
    with pytest.raises(CorpusError, match="redirects from https:// to http://example.org/b.txt; refused"):
        _check_redirect("https://example.org/a.txt", "https://example.org/a.txt", "http://example.org/b.txt", True)
    _check_redirect("http://example.org/a.txt", "http://example.org/a.txt", "https://example.org/a.txt", False)


def test_a_cached_download_without_checksum_is_reused_only_while_unchanged(tmp_path, server):
    httpd, url = server("ok")
    path = fetch_corpus(url, tmp_path / "cache")
    assert fetch_corpus(url, tmp_path / "cache") == path and httpd.hits == 1  # unchanged: reused, no request
    path.write_bytes(BODY[:-1] + b"?")  # same size, but written since: its stamp no longer matches
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert fetch_corpus(url, tmp_path / "cache").read_bytes() == BODY and httpd.hits == 2  # downloaded again
