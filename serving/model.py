"""The registered model, written as an MLflow "model from code": a pyfunc that generates text.

MLflow copies this file into the model, together with the `rnnlm` and `serving` packages (code_paths) and the checkpoint
(artifacts), so a registered version carries weights, vocab, config and sampling code and needs nothing else.
Input: a list of prompts. Params: num_preds (default 50, at most 10,000), temperature (> 0), top_k (1 = greedy
argmax, the book's predict), seed. Output: one string per prompt, the prompt followed by its continuation.

Under `mlflow models serve` (uvicorn; each worker process parses and predicts each request in a thread of its event
loop's default executor) the model serves many clients at once:
- batching: predict hands its prompts to one background thread (`Batcher`), which takes the requests queued while
  the previous batch ran (and, under load, those arriving within `batch_window_ms`), groups those with the same
  num_preds, temperature and top_k, and runs one `generate` call per group. Each prompt samples from its own stream
  (its request's seed, its row), so every client gets the text it would get alone.
- a budget per request (`max_prompts`, `max_work`), checked before any model work: a 400 that says how to split.
- MLflow's scoring server fitted to this (request threads, guarded parsing, the body limit, the request timeout):
  `serving/scoring.py`.
Each setting has a default (the budget's in `rnnlm.generate.BUDGET_DEFAULTS`, the others in `SERVE_DEFAULTS`), may
be set when the model is logged (its `model_config`, which `register_model` fills with the budget; or MLflow's
SERVING_MODEL_CONFIG) and when it is served: environment variables `RNNLM_SERVE_<NAME>`, e.g. RNNLM_SERVE_MAX_WORK.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from serving.scoring import SCORING_APP, hook_scoring_server, lean_scoring_app, trim_heap, when_abandoned

SERVE_DEFAULTS = {
    "max_body_bytes": 1024 * 1024,  # request bodies larger than this are refused before MLflow parses them
    "batch_window_ms": 10,  # under load, how long a batch waits for more requests (a lone client never waits)
    "max_batch_rows": 256,  # prompts gathered into one batch (a request that crosses it still joins whole)
    "threads": 64,  # the scoring server's request threads: each request waiting for its batch holds one
    "torch_threads": 1,  # torch's threads in the server: one for the batches, the other cores for HTTP
}
TRIM_AFTER_CHARS = 20_000  # characters of a batch group's texts after which freed memory is handed back to the OS

Key = tuple[int, float, int]  # what requests must share to run as one batch: num_preds, temperature, top_k
_logger = logging.getLogger(__name__)


class RNNLMModel(PythonModel):
    """Generates continuations of prompts with a trained rnnlm checkpoint."""

    def load_context(self, context) -> None:
        from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
        from rnnlm.generate import SAMPLING_DEFAULTS

        self.model, self.vocab, self.config = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))
        self.settings = serve_settings(context.model_config or {})
        self.batcher = None
        if SCORING_APP in sys.modules:  # loaded by `mlflow models serve`: many clients at once
            import torch

            torch.set_num_threads(self.settings["torch_threads"])
            window = self.settings["batch_window_ms"] / 1000
            self.batcher = Batcher(self._generate, window, self.settings["max_batch_rows"])
            hook_scoring_server(self.settings, list(SAMPLING_DEFAULTS))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from rnnlm.generate import GenerationError

        try:
            key, prompts, streams = self._request(model_input, params)
            if self.batcher is None:
                return self._generate(key, prompts, streams)
            if not self.batcher.started():
                lean_scoring_app()  # the app exists once a request comes
            return self.batcher.submit(key, prompts, streams)
        except GenerationError as err:  # a 400 from `mlflow models serve`, not a 500
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err

    def _request(self, model_input: list[str], params: dict[str, Any] | None):
        """Check a request (types, budget, vocabulary) before any model work; return its batch key, its prompts
        and their random streams."""
        from rnnlm.generate import SAMPLING_DEFAULTS, check_budget, check_request, prompt_ids, streams_of

        given = {k: v.item() if hasattr(v, "item") else v for k, v in (params or {}).items() if v is not None}
        options = {**SAMPLING_DEFAULTS, **given}  # MLflow hands numpy scalars for some params: plain values here
        num_preds, temperature, top_k, seed = (options[k] for k in ("num_preds", "temperature", "top_k", "seed"))
        prompts = list(model_input) if not isinstance(model_input, str) else [model_input]
        tokenization = self.config["tokenization"]
        check_request(prompts, num_preds, temperature, top_k, seed)
        check_budget(prompts, num_preds, tokenization, self.settings["max_prompts"], self.settings["max_work"])
        for prompt in prompts:  # refused here, alone, rather than failing a batch shared with other requests
            prompt_ids(prompt, self.vocab, tokenization)
        top_k = min(top_k, len(self.vocab))  # the same draws: top_k beyond the vocabulary changes nothing
        key = (num_preds, float(temperature) if top_k > 1 else 1.0, top_k)
        return key, prompts, streams_of(seed, len(prompts))

    def _generate(self, key: Key, prompts: list[str], streams: list) -> list[str]:
        """One `generate` call for prompts that share `key`; freed memory goes back to the OS after a large one."""
        from rnnlm.generate import generate

        num_preds, temperature, top_k = key
        tokenization = self.config["tokenization"]
        texts = generate(self.model, self.vocab, prompts, num_preds, tokenization, temperature, top_k, streams=streams)
        if sum(map(len, texts)) > TRIM_AFTER_CHARS:
            trim_heap()
        return texts


def serve_settings(model_config: dict[str, Any]) -> dict[str, int]:
    """The budget's and the server's defaults, overridden by the model's config, overridden by RNNLM_SERVE_<NAME>
    environment variables; a value that is not a whole number (>= 1; the window >= 0) is refused, naming it."""
    from rnnlm.generate import BUDGET_DEFAULTS

    settings = {}
    for name, default in {**BUDGET_DEFAULTS, **SERVE_DEFAULTS}.items():
        variable, least = f"RNNLM_SERVE_{name.upper()}", 0 if name == "batch_window_ms" else 1
        value = os.environ.get(variable, model_config.get(name, default))
        try:
            settings[name] = int(value)
        except (TypeError, ValueError):
            settings[name] = least - 1
        if settings[name] < least or str(settings[name]) != str(value).strip():
            raise ValueError(f"{variable} (or model_config {name!r}) must be a whole number >= {least}, got {value!r}")
    return settings


@dataclass(eq=False)  # compared by identity: two equal requests are two requests
class _Waiting:
    """One predict call waiting for its batch: what it asks and, once served, its texts or its error."""

    key: Key
    prompts: list[str]
    streams: list
    done: threading.Event = field(default_factory=threading.Event)
    texts: list[str] | None = None
    error: Exception | None = None


class Abandoned(Exception):
    """The request's caller stopped waiting for it (its timeout passed): its work was withdrawn."""


class Batcher:
    """Serves `submit` calls from many threads in one background thread, in batches: it takes every request queued
    (up to `max_rows` prompts in all), waiting up to `window_s` after the first for more while it is under load (the
    recent batches held several requests: clients answered together send their next requests together), then calls
    `run(key, prompts, streams)` once per group of requests with the same key, oldest group first, and hands each
    request its own rows. A request abandoned while it waits (its timeout passed) leaves the queue at once.

    One batch runs at a time, so a long request (10,000 tokens) delays the requests queued behind it.
    """

    def __init__(self, run: Callable[[Key, list[str], list], list[str]], window_s: float, max_rows: int):
        self._run, self._window_s, self._max_rows = run, window_s, max_rows
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._queued = threading.Condition()  # guards the queue; notified when a request joins it
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._load = 0.0  # requests per batch lately: the largest, halved at every batch after it

    def submit(self, key: Key, prompts: list[str], streams: list) -> list[str]:
        """Queue a request and wait for its texts (its batch's error is raised here; `Abandoned` if the server stopped
        waiting for it first)."""
        self._start()
        waiting = _Waiting(key, prompts, streams)
        with self._queued:
            self._queue.append(waiting)
            self._queued.notify()
        when_abandoned(lambda: self._withdraw(waiting))
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.texts

    def pending(self) -> int:
        """How many requests are queued for the next batch."""
        with self._queued:
            return len(self._queue)

    def started(self) -> bool:
        """Whether the background thread runs (a request came)."""
        return self._thread is not None

    def _withdraw(self, waiting: _Waiting) -> None:
        """A request nobody waits for any more: out of the queue if it is still there (else its batch runs it and its
        texts are dropped), and its thread freed."""
        with self._queued:
            if waiting in self._queue:
                self._queue.remove(waiting)
        waiting.error = Abandoned("the request was abandoned before its batch ran (its timeout passed)")
        waiting.done.set()

    def _start(self) -> None:
        """The background thread, started at the first request."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="rnnlm-batcher", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        """Forever: gather a batch, run it group by group."""
        while True:
            groups: dict[Key, list[_Waiting]] = {}
            for waiting in self._gather():
                groups.setdefault(waiting.key, []).append(waiting)
            for key, members in groups.items():
                self._run_group(key, members)

    def _gather(self) -> list[_Waiting]:
        """The oldest waiting request and every one queued after it, and under load those that arrive within the
        window after it."""
        with self._queued:
            self._queued.wait_for(lambda: self._queue)
            batch = [self._queue.popleft()]
            rows, wait = len(batch[0].prompts), self._window_s if self._load >= 2 else 0.0
            deadline = time.monotonic() + wait
            while rows < self._max_rows:
                if not self._queued.wait_for(lambda: self._queue, max(deadline - time.monotonic(), 0)):
                    break
                batch.append(self._queue.popleft())
                rows += len(batch[-1].prompts)
        self._load = max(len(batch), self._load / 2)
        return batch

    def _run_group(self, key: Key, members: list[_Waiting]) -> None:
        """One call for the group; each member gets its slice of the texts, or the call's error."""
        try:
            texts = self._run(key, [p for m in members for p in m.prompts], [s for m in members for s in m.streams])
        except Exception as err:  # handed to every member's thread, which answers its request with it
            texts, error = None, err
        start = 0
        for member in members:
            if texts is None:
                member.error = error
            else:
                member.texts, start = texts[start : start + len(member.prompts)], start + len(member.prompts)
            member.done.set()


mlflow.models.set_model(RNNLMModel())
