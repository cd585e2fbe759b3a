"""The served model's batching layer in-process (fast): requests grouped by their params, each prompt's text the same
alone and in a batch, the per-request budget, the settings, and the guard around MLflow's request parsing."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException

from rnnlm.generate import BUDGET_DEFAULTS, GenerationError, check_budget, generate, streams_of
from rnnlm.model import RNNLM
from rnnlm.tokens import Vocab
from serving.model import Batcher, serve_settings
from serving.scoring import SCORING_APP, RequestTimeout, guarded, lean_scoring_app, short_message

VOCAB = Vocab(["<unk>", " ", *"etaoinsrhldmucfwgypbvkxjqz"])
GREEDY, SAMPLED, BUSY, FAILING = (12, 1.0, 1), (12, 0.8, 5), (1, 1.0, 1), (2, 1.0, 1)


class FakeModel:
    """A batcher's `run`: records its calls; BUSY waits until `release`, FAILING raises."""

    def __init__(self):
        self.calls, self.busy, self.release = [], threading.Event(), threading.Event()

    def __call__(self, key, prompts, streams):
        if key == BUSY:
            self.busy.set()
            self.release.wait()
        if key == FAILING:
            raise ValueError("no such model")
        self.calls.append((key, len(prompts)))
        return [f"{key[2]}:{p}:{seed}.{row}" for p, (seed, row) in zip(prompts, streams, strict=True)]


def _submit_while_busy(batcher: Batcher, model: FakeModel, requests: list[tuple]) -> list:
    """Submit every (key, prompts) from its own thread while the batcher runs a BUSY request, so that all are queued
    when it gathers its next batch; their texts (or errors), in order."""
    results = [None] * (len(requests) + 1)  # the BUSY request's last

    def client(i: int, key, prompts) -> None:
        try:
            results[i] = batcher.submit(key, prompts, streams_of(i, len(prompts)))
        except ValueError as err:
            results[i] = err

    busy = threading.Thread(target=client, args=(len(requests), BUSY, ["x"]))
    busy.start()
    model.busy.wait()
    threads = [threading.Thread(target=client, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # every client's request queued
    model.release.set()
    for thread in [busy, *threads]:
        thread.join()
    return results[:-1]


def test_requests_queued_together_run_as_one_call_per_key():
    model = FakeModel()
    batcher = Batcher(model, window_s=0.01, max_rows=100)
    requests = [(GREEDY, ["a", "b"]), (GREEDY, ["c"]), (SAMPLED, ["d"]), (GREEDY, ["e"])]
    assert _submit_while_busy(batcher, model, requests) == [
        ["1:a:0.0", "1:b:0.1"],
        ["1:c:1.0"],
        ["5:d:2.0"],
        ["1:e:3.0"],
    ]
    assert sorted(model.calls[1:]) == sorted([(GREEDY, 4), (SAMPLED, 1)])  # one call per key


def test_a_failed_call_fails_its_own_group_only_and_the_batcher_keeps_serving():
    model = FakeModel()
    batcher = Batcher(model, window_s=0.01, max_rows=100)
    results = _submit_while_busy(batcher, model, [(GREEDY, ["a"]), (FAILING, ["b"]), (FAILING, ["c"])])
    assert results[0] == ["1:a:0.0"] and all(str(r) == "no such model" for r in results[1:])
    assert batcher.submit(GREEDY, ["d"], streams_of(9, 1)) == ["1:d:9.0"]


def test_a_batch_stops_growing_at_max_rows():
    model = FakeModel()
    batcher = Batcher(model, window_s=0.01, max_rows=3)
    _submit_while_busy(batcher, model, [(GREEDY, [f"p{i}"]) for i in range(7)])
    assert sum(n for _, n in model.calls[1:]) == 7 and max(n for _, n in model.calls[1:]) == 3


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_each_prompt_gets_the_same_text_alone_and_in_a_batch(rnn):
    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), 32, rnn).eval()
    prompts = ["time traveller", "a", "the machine", "it was the time traveller said", "we", "a"]
    for options in ({}, {"temperature": 0.8, "top_k": 5}, {"temperature": 1.5, "top_k": 100}):
        alone = [generate(model, VOCAB, [p], 40, seed=100 + i, **options)[0] for i, p in enumerate(prompts)]
        streams = [(100 + i, 0) for i in range(len(prompts))]
        assert generate(model, VOCAB, prompts, 40, streams=streams, **options) == alone, options
    sampled = generate(model, VOCAB, ["a", "a"], 40, temperature=1.5, top_k=100, seed=7)
    assert sampled[0] != sampled[1]  # two rows of one request: two streams


def test_sampling_draws_from_the_tempered_top_k_softmax():
    from rnnlm.generate import _pick

    torch.manual_seed(0)
    logits = torch.randn(1, 10).repeat(100_000, 1)
    counts = torch.bincount(_pick(logits, 0.7, 4, torch.rand(100_000)), minlength=10) / 100_000
    values, indices = logits[0].topk(4)
    expected = torch.zeros(10).index_put_((indices,), torch.softmax(values / 0.7, -1))
    assert (counts - expected).abs().max() < 0.01
    cold = _pick(torch.tensor([[1.0, 5.0, 3.0]]), 1e-300, 3, torch.tensor([0.999]))
    assert cold.tolist() == [1]  # far below float32's range: argmax, not NaN


@pytest.mark.parametrize(
    "prompts, num_preds, message",
    [
        (["the"] * 257, 10, "257 prompts in one request, over the limit of 256 (max_prompts); send them in 2 requests"),
        (["the"] * 64, 10_000, "split it into 8 requests of at most 9 prompts"),
        (["the " * 30_000], 10, "prompt 0 alone costs 120,010 tokens, over the limit of 100,000 tokens of work"),
    ],
)
def test_requests_over_the_budget_are_refused_with_how_to_split_them(prompts, num_preds, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_budget(prompts, num_preds, "char", **BUDGET_DEFAULTS)
    check_budget(["the"] * 256, 300, "char", **BUDGET_DEFAULTS)  # at the limits: allowed


def test_settings_come_from_defaults_the_model_config_and_the_environment(monkeypatch):
    assert serve_settings({})["max_work"] == BUDGET_DEFAULTS["max_work"]
    assert serve_settings({"max_work": 500})["max_work"] == 500
    monkeypatch.setenv("RNNLM_SERVE_MAX_WORK", "700")
    assert serve_settings({"max_work": 500})["max_work"] == 700
    monkeypatch.setenv("RNNLM_SERVE_MAX_PROMPTS", "2.5")
    with pytest.raises(ValueError, match="RNNLM_SERVE_MAX_PROMPTS.*whole number >= 1, got '2.5'"):
        serve_settings({})


def test_the_guard_answers_bodies_mlflow_cannot_parse_with_4xx():
    def invocations(data, content_type, model, input_schema):
        if data.startswith(b"["):
            return json.loads(data)  # RecursionError for deep nesting, as in MLflow's parsing
        raise MlflowException(f"Failed to predict data '{data.decode()}'. \nError: prompt 'x' is refused")

    checked = guarded(invocations, max_body_bytes=1_000_000)
    deep = checked(b"[" * 100_000 + b"]" * 100_000, "application/json", None, None)
    assert deep.status == 400 and "nested too deeply" in json.loads(deep.response)["message"]
    large = checked(b" " * 1_000_001, "application/json", None, None)
    assert large.status == 413 and "over the limit of 1,000,000 (max_body_bytes" in large.response
    with pytest.raises(MlflowException) as refused:
        checked(b'{"inputs": ["' + b"a" * 100_000 + b'"]}', "application/json", None, None)
    assert refused.value.message == "Failed to predict: prompt 'x' is refused"
    assert len(short_message("Invalid input.\nInput: \n" + "x" * 10_000)) < 100


def test_the_request_timeout_answers_504_past_it_and_passes_quick_requests_through():
    async def app(scope, receive, send):  # answers after the seconds the path asks for
        await asyncio.sleep(float(scope["path"].strip("/")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async def call(path: str) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await RequestTimeout(app, seconds=0.2)({"type": "http", "path": path}, None, send)
        return sent

    quick, slow = asyncio.run(call("/0")), asyncio.run(call("/5"))
    assert quick[0]["status"] == 200 and quick[1]["body"] == b"done"
    assert slow[0]["status"] == 504 and b"exceeded" in slow[1]["body"]


def test_mlflows_timeout_middleware_is_swapped_for_the_plain_one_and_the_app_still_serves(monkeypatch, tmp_path):
    """The real scoring app of a logged model: after the swap its middleware is `RequestTimeout` with MLflow's
    timeout, and it answers /invocations as before."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server
    from starlette.middleware.base import BaseHTTPMiddleware

    model = scoring_server.load_model(_logged_model(tmp_path))
    app = scoring_server.init(model)
    client = TestClient(app)
    body = {"inputs": ["the time"], "params": {"num_preds": 5}}
    before = client.post("/invocations", json=body)
    assert before.status_code == 200, before.text
    assert [m.cls for m in app.user_middleware] == [BaseHTTPMiddleware]
    monkeypatch.setitem(sys.modules, SCORING_APP, types.SimpleNamespace(app=app))
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")
    assert lean_scoring_app()
    assert [(m.cls, m.kwargs) for m in app.user_middleware] == [(RequestTimeout, {"seconds": 7})]
    after = client.post("/invocations", json=body)
    assert after.status_code == 200 and after.json() == before.json()
    assert not lean_scoring_app()  # nothing left to swap


def _logged_model(folder) -> str:
    """A small book-style model logged as the project's pyfunc in a local folder; its path."""
    import mlflow

    from rnnlm import paths
    from rnnlm.checkpoint import save_checkpoint
    from rnnlm.config import TrainConfig
    from rnnlm.generate import SAMPLING_DEFAULTS

    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), 8, "rnn")
    checkpoint = folder / "model.pt"
    config = TrainConfig(num_hiddens=8).model_dump(mode="json")
    save_checkpoint(checkpoint, model=model.state_dict(), config=config, vocab=VOCAB.tokens)
    code = Path(__file__).resolve().parents[2] / "serving" / "model.py"
    path = folder / "logged"
    mlflow.pyfunc.save_model(
        path, python_model=str(code), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(paths.PACKAGE), str(code.parent)], input_example=(["time"], SAMPLING_DEFAULTS),
    )  # fmt: skip
    return str(path)
