"""The champion served by the real `mlflow models serve` on a free loopback port: generation, refused requests,
concurrent requests batched without changing anyone's text, the per-request budget and bodies MLflow cannot parse."""

from __future__ import annotations

import threading

import mlflow
import pytest
import requests
from helpers import registry_config
from helpers.services import model_server

from flows.train_flow import train_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

CHAMPION = "models:/rnnlm@champion"
SAMPLED = {"temperature": 0.8, "top_k": 5}

BAD_REQUESTS = {
    "empty prompt list": ({"inputs": []}, "non-empty list of prompt strings"),
    "empty prompt": ({"inputs": [""]}, "at least one token"),
    "unknown characters": ({"inputs": ["Time Traveller!"]}, "outside the vocabulary: ['T', '!']"),
    "num_preds over the cap": ({"inputs": ["time"], "params": {"num_preds": 10_001}}, "from 0 to 10,000"),
    "negative num_preds": ({"inputs": ["time"], "params": {"num_preds": -1}}, "from 0 to 10,000"),
    "num_preds not an integer": ({"inputs": ["time"], "params": {"num_preds": "many"}}, "num_preds"),
    "fractional num_preds": ({"inputs": ["time"], "params": {"num_preds": 2.5}}, "num_preds"),
    "temperature zero": ({"inputs": ["time"], "params": {"temperature": 0}}, "temperature must be a finite number > 0"),
    "temperature a string": ({"inputs": ["time"], "params": {"temperature": "hot"}}, "temperature"),
    "top_k zero": ({"inputs": ["time"], "params": {"top_k": 0}}, "top_k must be an integer >= 1"),
    "top_k a boolean": ({"inputs": ["time"], "params": {"top_k": True}}, "top_k"),
    "seed a string": ({"inputs": ["time"], "params": {"seed": "x"}}, "seed"),
    "prompts not strings": ({"inputs": [1, 2]}, "Expected type str"),
    "a string, not a list": ({"inputs": "time"}, "Expected list"),
    "20,000 prompts": ({"inputs": ["time"] * 20_000}, "over the limit of 256 (max_prompts); send them in 79 requests"),
    "64 prompts x 10,000 tokens": (
        {"inputs": ["the"] * 64, "params": {"num_preds": 10_000}},
        "costs 640,192 tokens, over the limit of 100,000 tokens of work per request (max_work",
    ),
}
# Small limits for a server started with them in its environment (the defaults are 256 prompts, 100,000 tokens).
LIMITS = {"RNNLM_SERVE_MAX_PROMPTS": "4", "RNNLM_SERVE_MAX_WORK": "400", "RNNLM_SERVE_MAX_BODY_BYTES": "20000"}
REFUSED_UNDER_LIMITS = {
    "too many prompts": ({"inputs": ["the"] * 5}, 400, "5 prompts in one request, over the limit of 4 (max_prompts)"),
    "too much work": (
        {"inputs": ["the"] * 4, "params": {"num_preds": 150}},
        400,
        "costs 612 tokens, over the limit of 400 tokens of work per request (max_work: prompts x (prompt tokens + "
        "num_preds)); split it into 2 requests of at most 2 prompts",
    ),
    "one prompt too long": ({"inputs": ["time " * 80]}, 400, "prompt 0 alone costs 450 tokens, over the limit of 400"),
    "a body over the limit": ({"inputs": ["the"] * 5000}, 413, "over the limit of 20,000 (max_body_bytes"),
}
BAD_BODIES = {  # (body, the status, a part of the message)
    "JSON nested 3,000 deep": ('{"inputs": ' + "[" * 3000 + "]" * 3000 + "}", 400, "nested too deeply"),
    "params nested 3,000 deep": ('{"inputs": ["a"], "params": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}", 400, "deep"),
    "malformed JSON": ('{"inputs": ["time"', 400, "valid JSON"),
    "not UTF-8": (b'{"inputs": ["\xff"]}', 400, "valid JSON"),
    "a list, not an object": ('["time"]', 400, "JSON dictionary"),
    "inputs an object": ('{"inputs": {"a": "b"}}', 400, "Expected list"),
    "params a list": ('{"inputs": ["time"], "params": [1]}', 400, "Parameters must be a dictionary"),
}


@pytest.fixture
def champion(tmp_path, small_corpus, mlflow_store) -> str:
    """Train and promote a small model; returns the store's URI (its champion is CHAMPION)."""
    out = train_flow(registry_config(tmp_path, str(small_corpus), promote=True))
    assert out["version"] == 1
    return mlflow_store


@pytest.fixture
def served_champion(champion, tmp_path):
    """`mlflow models serve` of the champion with the default limits; yields the invocations URL."""
    with model_server(CHAMPION, champion, tmp_path / "serve.log") as (url, _):
        yield f"{url}/invocations"


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


def _requests_of_many_clients() -> list[dict]:
    """24 requests as different clients send them: greedy and sampled, one or two prompts, two lengths, own seeds."""
    prompts = ["time traveller", "the machine", "it was", "a", "we said"]
    bodies = []
    for i in range(24):
        params = {"num_preds": 30 if i % 4 else 12, "seed": 100 + i // 2} | (SAMPLED if i % 3 else {})
        bodies.append({"inputs": [prompts[i % 5], prompts[(i + 2) % 5]][: 1 + i % 2], "params": params})
    return bodies


def _all_at_once(url: str, bodies: list[dict]) -> list:
    """Send every body at the same moment, each from its own thread; their predictions, in order."""
    results, barrier = [None] * len(bodies), threading.Barrier(len(bodies))

    def client(i: int) -> None:
        barrier.wait()
        response = requests.post(url, json=bodies[i], timeout=120)
        results[i] = response.json()["predictions"] if response.status_code == 200 else response.text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_requests_get_the_texts_they_get_alone(served_champion, champion):
    bodies = _requests_of_many_clients()
    alone = [requests.post(served_champion, json=body, timeout=60).json()["predictions"] for body in bodies]
    for _ in range(2):  # batched with each other now: the same texts, sampled ones included
        assert _all_at_once(served_champion, bodies) == alone
    sampled = [texts for body, texts in zip(bodies, alone, strict=True) if "top_k" in body["params"]]
    assert len({texts[0] for texts in sampled}) > len(sampled) // 2  # their own seeds: their own texts
    model = mlflow.pyfunc.load_model(CHAMPION)  # and what the model gives in-process, without a server
    assert [model.predict(b["inputs"], params=b["params"]) for b in bodies[:6]] == alone[:6]


def test_budget_and_bad_bodies_get_4xx_and_the_server_keeps_serving(champion, tmp_path):
    normal = {"inputs": ["time traveller"], "params": {"num_preds": 20, **SAMPLED, "seed": 3}}
    with model_server(CHAMPION, champion, tmp_path / "limits.log", **LIMITS) as (url, _):
        first = requests.post(f"{url}/invocations", json=normal, timeout=60)
        assert first.status_code == 200, first.text
        for name, (body, status, message) in REFUSED_UNDER_LIMITS.items():
            response = requests.post(f"{url}/invocations", json=body, timeout=60)
            assert response.status_code == status and message in response.json()["message"], f"{name}: {response.text}"
            assert len(response.text) < 3000, f"{name}: the message repeats the request"
        headers = {"Content-Type": "application/json"}
        for name, (body, status, message) in BAD_BODIES.items():
            response = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=60)
            assert response.status_code == status and message in response.json()["message"], f"{name}: {response.text}"
            assert len(response.text) < 3000, f"{name}: the message repeats the request"
        again = requests.post(f"{url}/invocations", json=normal, timeout=60)
        assert again.status_code == 200 and again.json() == first.json()
