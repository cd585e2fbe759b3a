"""The served model's batching layer in-process (fast): requests grouped by their params, each prompt's text the same
alone and in a batch, the per-request budget, the settings, and the guard around MLflow's request parsing."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import types

import pytest
import torch
from helpers.served import VOCAB, logged_model
from mlflow.exceptions import MlflowException

from rnnlm.generate import BUDGET_DEFAULTS, GenerationError, check_budget, generate, streams_of
from rnnlm.model import RNNLM
from serving.model import Batcher, serve_settings
from serving.scoring import SCORING_APP, PooledAsyncio, RequestTimeout, guarded, lean_scoring_app, short_message

GREEDY, SAMPLED, BUSY, FAILING = (12, 1.0, 1), (12, 0.8, 5), (1, 1.0, 1), (2, 1.0, 1)


class FakeModel:
    """A batcher's `run`: records its calls; BUSY waits until `release`, FAILING raises."""

    def __init__(self):
        self.calls, self.prompts, self.busy, self.release = [], [], threading.Event(), threading.Event()

    def __call__(self, key, prompts, streams):
        if key == BUSY:
            self.busy.set()
            self.release.wait()
        if key == FAILING:
            raise ValueError("no such model")
        self.calls.append((key, len(prompts)))
        self.prompts += prompts
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
    _until(lambda: batcher.pending() == len(requests))  # every client's request queued
    model.release.set()
    for thread in [busy, *threads]:
        thread.join()
    return results[:-1]


def _until(condition, seconds: float = 60) -> None:
    """Wait until `condition()` holds (checked every millisecond); fail after `seconds` (a hang, not a slow machine)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.001)


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


def test_a_request_abandoned_by_its_timeout_leaves_the_queue_and_never_runs():
    """The request's coroutine cancelled as the request timeout cancels it (then answers 504): its queued work is
    withdrawn at once, its thread freed, and the batcher never runs it."""
    model, pool = FakeModel(), PooledAsyncio(4)
    batcher = Batcher(model, window_s=0.01, max_rows=100)

    async def scenario() -> tuple[int, list[str]]:
        busy = asyncio.ensure_future(pool.to_thread(batcher.submit, BUSY, ["x"], streams_of(0, 1)))
        await asyncio.to_thread(model.busy.wait)
        late = asyncio.ensure_future(pool.to_thread(batcher.submit, GREEDY, ["late"], streams_of(1, 1)))
        await asyncio.to_thread(_until, lambda: batcher.pending() == 1)
        late.cancel()  # what RequestTimeout's wait_for does past the timeout
        with pytest.raises(asyncio.CancelledError):
            await late
        queued = batcher.pending()
        model.release.set()
        await busy
        return queued, await pool.to_thread(batcher.submit, GREEDY, ["next"], streams_of(2, 1))

    queued, texts = asyncio.run(scenario())
    assert queued == 0 and texts == ["1:next:2.0"]
    assert model.prompts == ["x", "next"]  # "late" never ran


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
    async def app(scope, receive, send):  # "/quick" answers at once; "/stuck" never does
        if scope["path"] == "/stuck":
            await asyncio.Event().wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async def call(path: str, seconds: float) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await RequestTimeout(app, seconds=seconds)({"type": "http", "path": path}, None, send)
        return sent

    quick, stuck = asyncio.run(call("/quick", 600)), asyncio.run(call("/stuck", 0.01))
    assert quick[0]["status"] == 200 and quick[1]["body"] == b"done"
    assert stuck[0]["status"] == 504 and b"exceeded" in stuck[1]["body"]


def test_mlflows_timeout_middleware_is_swapped_for_the_plain_one_and_the_app_still_serves(monkeypatch, tmp_path):
    """The real scoring app of a logged model: after the swap its middleware is `RequestTimeout` with MLflow's
    timeout, and it answers /invocations as before."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server
    from starlette.middleware.base import BaseHTTPMiddleware

    model = scoring_server.load_model(logged_model(tmp_path))
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


def test_the_app_refuses_unknown_params_and_bodies_over_the_limit_before_reading_them(monkeypatch, tmp_path):
    """The real scoring app built with the hooks `load_context` installs: a 400 naming an unknown parameter, a 413
    from a Content-Length over the limit and from a chunked body as soon as it passes the limit, and requests within
    the limits served."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from serving.scoring import checked_params, limiting

    monkeypatch.setattr(scoring_server, "_async_catch_mlflow_exception", limiting(
        scoring_server._async_catch_mlflow_exception, 2000))  # fmt: skip
    split = checked_params(scoring_server._split_data_and_params, ["num_preds", "seed", "temperature", "top_k"])
    monkeypatch.setattr(scoring_server, "_split_data_and_params", split)
    client = TestClient(scoring_server.init(scoring_server.load_model(logged_model(tmp_path))))

    served = client.post("/invocations", json={"inputs": ["the time"], "params": {"num_preds": 5}})
    assert served.status_code == 200, served.text
    misspelled = client.post("/invocations", json={"inputs": ["the time"], "params": {"topk": 5, "sead": 1}})
    assert misspelled.status_code == 400
    assert misspelled.json()["message"] == (
        "unknown parameters 'sead', 'topk'; the accepted ones are num_preds, seed, temperature, top_k"
    )
    declared = client.post("/invocations", json={"inputs": ["the"] * 1000})
    assert declared.status_code == 413 and "has 6,012 bytes, over the limit of 2,000" in declared.json()["message"]
    chunks = (b" " * 1000 for _ in range(100))  # a chunked body: no Content-Length, counted as it comes
    streamed = client.post("/invocations", content=chunks, headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "more than 2,000 bytes" in streamed.json()["message"]
