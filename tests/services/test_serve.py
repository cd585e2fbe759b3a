"""The champion served by the real `mlflow models serve` on a free loopback port: generation and refused requests."""

from __future__ import annotations

import pytest
import requests
from helpers import registry_config
from helpers.services import free_port, service_env, start, stop, wait_until_up

from flows.train_flow import train_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

BAD_REQUESTS = {
    "empty prompt list": ({"inputs": []}, "non-empty list of prompt strings"),
    "empty prompt": ({"inputs": [""]}, "at least one token"),
    "unknown characters": ({"inputs": ["Time Traveller!"]}, "outside the vocabulary: ['T', '!']"),
    "num_preds over the cap": ({"inputs": ["time"], "params": {"num_preds": 10_001}}, "from 0 to 10,000"),
    "negative num_preds": ({"inputs": ["time"], "params": {"num_preds": -1}}, "from 0 to 10,000"),
    "num_preds not an integer": ({"inputs": ["time"], "params": {"num_preds": "many"}}, "num_preds"),
    "fractional num_preds": ({"inputs": ["time"], "params": {"num_preds": 2.5}}, "num_preds"),
    "temperature zero": ({"inputs": ["time"], "params": {"temperature": 0}}, "temperature must be a number > 0"),
    "temperature a string": ({"inputs": ["time"], "params": {"temperature": "hot"}}, "temperature"),
    "top_k zero": ({"inputs": ["time"], "params": {"top_k": 0}}, "top_k must be an integer >= 1"),
    "top_k a boolean": ({"inputs": ["time"], "params": {"top_k": True}}, "top_k"),
    "seed a string": ({"inputs": ["time"], "params": {"seed": "x"}}, "seed"),
    "prompts not strings": ({"inputs": [1, 2]}, "Expected type str"),
    "a string, not a list": ({"inputs": "time"}, "Expected list"),
}


@pytest.fixture
def served_champion(tmp_path, small_corpus, mlflow_store):
    """Train and promote a small model, then serve `models:/rnnlm@champion`; yields the invocations URL."""
    out = train_flow(registry_config(tmp_path, str(small_corpus), promote=True))
    assert out["version"] == 1
    port, log = free_port(), tmp_path / "serve.log"
    command = ["mlflow", "models", "serve", "-m", "models:/rnnlm@champion", "--env-manager", "local"]
    server = start(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        service_env(MLFLOW_TRACKING_URI=mlflow_store, MLFLOW_REGISTRY_URI=mlflow_store),
        log,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(server)


def test_served_champion_generates_and_refuses_bad_requests(served_champion):
    request = {"inputs": ["time traveller"], "params": {"num_preds": 50, "temperature": 0.8, "top_k": 5, "seed": 1}}
    first = requests.post(served_champion, json=request, timeout=60)
    assert first.status_code == 200, first.text
    [text] = first.json()["predictions"]
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 50
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz ")

    for name, (body, message) in BAD_REQUESTS.items():
        response = requests.post(served_champion, json=body, timeout=60)
        assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
        assert message in response.json()["message"], f"{name}: {response.text}"
    not_json = requests.post(served_champion, data="not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400

    # Still serving, and the same request with the same seed gives the same text.
    again = requests.post(served_champion, json=request, timeout=60)
    assert again.status_code == 200 and again.json()["predictions"] == [text]
    greedy = requests.post(served_champion, json={"inputs": ["the", "a"], "params": {"num_preds": 5}}, timeout=60)
    assert [len(t) for t in greedy.json()["predictions"]] == [8, 6]
