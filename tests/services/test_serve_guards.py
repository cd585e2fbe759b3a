"""The guards of the served model under the real `mlflow models serve`: a misspelled parameter gets a 400 naming it,
and a body over the limit is refused from its Content-Length, or while it streams in, before the server holds it."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

import pytest
import requests
from helpers.served import logged_model
from helpers.services import model_server

pytestmark = pytest.mark.slow

HUGE = 300 * 1024 * 1024  # the body a careless client sends (the limit is 1 MiB)
CHUNK = 1024 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[str, int]:
    """`mlflow models serve` of a small logged model with the default limits; its URL and process group."""
    folder = tmp_path_factory.mktemp("served")
    with model_server(logged_model(folder), f"sqlite:///{folder / 'mlflow.db'}", folder / "serve.log") as server:
        yield server


def _resident_bytes(group: int) -> int:
    """The resident memory (VmRSS) of every process in the process group `group`: the server and its workers."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == group:
                status = (entry / "status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):  # gone meanwhile, or a kernel thread without VmRSS
            continue
    return total


def _post_raw(url: str, headers: str, body_chunks) -> bytes:
    """POST to /invocations over a plain socket, sending `body_chunks` until the server answers (or all are sent);
    the answer's status line and headers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:  # answered already: stop sending
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return sock.recv(65536)


def test_a_misspelled_parameter_gets_a_400_naming_it_and_the_accepted_ones(served):
    url, _ = served
    response = requests.post(f"{url}/invocations", json={"inputs": ["time"], "params": {"topk": 5}}, timeout=60)
    assert response.status_code == 400, response.text
    message = "unknown parameter 'topk'; the accepted ones are num_preds, seed, temperature, top_k"
    assert response.json()["message"] == message
    good = requests.post(f"{url}/invocations", json={"inputs": ["time"], "params": {"top_k": 5}}, timeout=60)
    assert good.status_code == 200, good.text


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(served):
    url, group = served
    before = _resident_bytes(group)
    headers = f"Content-Type: application/json\r\nContent-Length: {HUGE}\r\n"
    answer = _post_raw(url, headers, [b"{" + b" " * (CHUNK - 1)])  # then nothing more: the server must not wait for it
    assert answer.startswith(b"HTTP/1.1 413"), answer
    grown = _resident_bytes(group) - before
    assert grown < HUGE // 10, f"the server grew by {grown:,} bytes"


def test_a_chunked_body_is_refused_as_it_streams_past_the_limit(served):
    url, group = served
    before = _resident_bytes(group)
    chunk = b" " * CHUNK
    chunks = [f"{CHUNK:x}\r\n".encode() + chunk + b"\r\n"] * (HUGE // CHUNK) + [b"0\r\n\r\n"]
    answer = _post_raw(url, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    grown = _resident_bytes(group) - before
    assert grown < HUGE // 10, f"the server grew by {grown:,} bytes"
    assert requests.post(f"{url}/invocations", json={"inputs": ["time"]}, timeout=60).status_code == 200
