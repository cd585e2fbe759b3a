"""The served model's changes to MLflow's scoring server (`mlflow models serve`, a FastAPI app under uvicorn), made
in its module's names only, from the model's `load_context` and its first request:
- request threads enough for every request waiting for its batch (`PooledAsyncio`); a request abandoned by its
  timeout tells its thread (`when_abandoned`), so that its queued work is withdrawn;
- request bodies over `max_body_bytes` refused with a 413 from their Content-Length, or as they stream in, before
  the server holds them (`limit_body`);
- params the model does not take refused with a 400 naming them (`checked_params`; MLflow drops them with a warning);
- MLflow's request parsing guarded (`guarded`): a 400 instead of MLflow's 500 for JSON nested too deeply, error
  messages without the copy of the input MLflow puts in them;
- freed memory handed back to the OS (glibc's malloc_trim) after large requests (`trim_heap`);
- the request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, a 504 past it) kept, as a plain ASGI middleware
  (`RequestTimeout`) in place of MLflow's Starlette BaseHTTPMiddleware, which cost the event loop more per request
  than the rest of the app (`lean_scoring_app`, at the first request).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import json
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlflow.exceptions import MlflowException

TRIM_AFTER_BYTES = 256 * 1024  # bytes of a body after which freed memory is handed back to the OS
SCORING_APP = "mlflow.pyfunc.scoring_server.app"  # the module `mlflow models serve` runs; it loads the model


def hook_scoring_server(settings: dict[str, int], accepted_params: list[str]) -> None:
    """Fit MLflow's scoring server (loading this model now) to batching, in its module's names only: request threads
    enough for every waiting request (`PooledAsyncio`), request bodies limited as they stream in (`limit_body`), params
    other than `accepted_params` refused (`checked_params`), and its request parsing guarded (`guarded`)."""
    from mlflow.pyfunc import scoring_server

    if not isinstance(scoring_server.asyncio, PooledAsyncio):
        scoring_server.asyncio = PooledAsyncio(settings["threads"])
    catch = scoring_server._async_catch_mlflow_exception  # decorates the /invocations endpoint when the app is built
    if not getattr(catch, "rnnlm_limited", False):
        scoring_server._async_catch_mlflow_exception = limiting(catch, settings["max_body_bytes"])
    if not getattr(scoring_server._split_data_and_params, "rnnlm_checked", False):
        scoring_server._split_data_and_params = checked_params(scoring_server._split_data_and_params, accepted_params)
    if not getattr(scoring_server.invocations, "rnnlm_guarded", False):
        scoring_server.invocations = guarded(scoring_server.invocations, settings["max_body_bytes"])


def lean_scoring_app() -> bool:
    """MLflow's scoring app (built after the model loads, so reachable from the first request on) with its request
    timeout as a plain ASGI middleware (`RequestTimeout`) in place of Starlette's BaseHTTPMiddleware, which costs the
    event loop more per request than the rest of the app; the app rebuilds its middleware from the next request on.
    False where the app is not as expected (then it stays as it is)."""
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    app = getattr(sys.modules.get(SCORING_APP), "app", None)
    for i, middleware in enumerate(getattr(app, "user_middleware", [])):
        dispatch = middleware.kwargs.get("dispatch")
        if middleware.cls is BaseHTTPMiddleware and getattr(dispatch, "__name__", "") == "timeout_middleware":
            from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

            app.user_middleware[i] = Middleware(RequestTimeout, seconds=MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
            app.middleware_stack = None
            return True
    return False


class RequestTimeout:
    """ASGI middleware: a 504 for an HTTP request not answered within `seconds`, as MLflow's timeout middleware
    answers it."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracked), self.seconds)
        except TimeoutError:
            if started:  # too late for a 504
                raise
            body = b"Request processing time exceeded limit"
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 504, "headers": headers})
            await send({"type": "http.response.body", "body": body})


class PooledAsyncio:
    """`asyncio` as MLflow's scoring server module sees it, except that `to_thread` (which runs each request's
    parsing and predict) uses a pool of `size` threads: the event loop's default pool has os.cpu_count() + 4, and a
    request waiting for its batch holds its thread, so that pool would cap a batch at 6 requests on 2 cores. A call
    whose caller stops waiting (its request timed out) runs the callbacks its thread gave `when_abandoned`."""

    def __init__(self, size: int):
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="rnnlm-request")

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def to_thread(self, func, /, *args, **kwargs):
        """`asyncio.to_thread` on this pool."""
        context, abandoned = contextvars.copy_context(), _Abandoned()
        context.run(_ABANDONED.set, abandoned)
        call = functools.partial(context.run, func, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except asyncio.CancelledError:  # the request's timeout (or its client) cancelled it: the thread runs on
            abandoned.fire()
            raise


class _Abandoned:
    """The callbacks to run when nobody waits any more for the thread that registered them."""

    def __init__(self):
        self._lock, self._callbacks, self._fired = threading.Lock(), [], False

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._fired:
                self._callbacks.append(callback)
                return
        callback()  # abandoned already

    def fire(self) -> None:
        with self._lock:
            self._fired, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()


_ABANDONED: contextvars.ContextVar[_Abandoned | None] = contextvars.ContextVar("rnnlm_abandoned", default=None)


def when_abandoned(callback: Callable[[], None]) -> None:
    """Run `callback` (at once if it happened already) when the request this thread works for is abandoned: its
    timeout passed and it was answered with a 504. Nothing happens outside a thread of `PooledAsyncio`."""
    if (abandoned := _ABANDONED.get()) is not None:
        abandoned.add(callback)


class _BodyTooLarge(Exception):
    """Raised from a request's `receive` once its body has passed the limit."""


def limit_body(endpoint: Callable, max_bytes: int) -> Callable:
    """The endpoint `endpoint(request)` with its request's body limited to `max_bytes`, checked on the ASGI messages
    before anything holds the body: a 413 from the Content-Length header before any of it is read, or as soon as the
    chunks streamed in (a chunked body) pass the limit. (An app middleware would do it too, but MLflow's app is built
    after the model loads and could take one only from its second request on; its endpoint is decorated as it is
    built.)"""
    from starlette.requests import Request
    from starlette.responses import Response

    def too_large(size: str) -> Response:
        message = (
            f"the request body has {size} bytes, over the limit of {max_bytes:,} (max_body_bytes, "
            "RNNLM_SERVE_MAX_BODY_BYTES); split its prompts over several requests"
        )
        return Response(_error_body(message), status_code=413, media_type="application/json")

    @functools.wraps(endpoint)
    async def limited(request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            return too_large(f"{int(declared):,}")
        received = 0

        async def counted():
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _BodyTooLarge
            return message

        try:
            return await endpoint(Request(request.scope, counted))
        except _BodyTooLarge:
            return too_large(f"more than {max_bytes:,}")

    return limited


def limiting(decorator: Callable, max_bytes: int) -> Callable:
    """An endpoint decorator that applies `decorator` to the endpoint with its body limited (`limit_body`)."""

    @functools.wraps(decorator)
    def decorate(endpoint: Callable) -> Callable:
        return decorator(limit_body(endpoint, max_bytes))

    decorate.rnnlm_limited = True
    return decorate


def checked_params(split: Callable, accepted: list[str]) -> Callable:
    """MLflow's `_split_data_and_params(body)` -> (data, params), refusing (a 400) params whose names are not in
    `accepted`, which MLflow would drop with only a warning in the server's log."""

    @functools.wraps(split)
    def split_checked(body):
        data, params = split(body)
        if isinstance(params, dict) and (unknown := sorted(set(map(str, params)) - set(accepted))):
            raise MlflowException.invalid_parameter_value(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"the accepted ones are {', '.join(sorted(accepted))}"
            )
        return data, params

    split_checked.rnnlm_checked = True
    return split_checked


def guarded(invocations: Callable, max_body_bytes: int) -> Callable:
    """MLflow's `invocations(data, content_type, model, input_schema)` (parse a body, predict, answer), with a 413
    for bodies over `max_body_bytes`, a 400 for JSON nested deeper than Python's recursion limit (MLflow's json.loads
    raises RecursionError there, which nothing catches: a 500), short error messages, and freed memory handed back
    to the OS after a large body."""
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    def refuse(status: int, message: str) -> InvocationsResponse:
        return InvocationsResponse(response=_error_body(message), status=status, mimetype="application/json")

    @functools.wraps(invocations)
    def checked(data, content_type, model, input_schema):
        if len(data) > max_body_bytes:
            return refuse(
                413,
                f"the request body has {len(data):,} bytes, over the limit of {max_body_bytes:,} (max_body_bytes, "
                "RNNLM_SERVE_MAX_BODY_BYTES); split its prompts over several requests",
            )
        try:
            return invocations(data, content_type, model, input_schema)
        except RecursionError:
            return refuse(400, 'the JSON body is nested too deeply; send {"inputs": [prompts], "params": {...}}')
        except MlflowException as err:
            err.message = short_message(err.message)
            raise
        finally:
            if len(data) > TRIM_AFTER_BYTES:
                trim_heap()

    checked.rnnlm_guarded = True
    return checked


def _error_body(message: str) -> str:
    """An error as MLflow's scoring server answers one."""
    return json.dumps({"error_code": "BAD_REQUEST", "message": message})


def short_message(message: str, limit: int = 2000) -> str:
    """An MLflow error message without the copy of the request it embeds (megabytes for a large request)."""
    head, sep, reason = message.partition("'. \nError: ")
    if sep and head.startswith("Failed to predict data '"):
        message = f"Failed to predict: {reason}"
    from rnnlm.generate import clip_text

    return clip_text(message.split("\nInput: \n", 1)[0], limit)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None under another C library."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps them otherwise); a no-op without glibc."""
    if (trim := _malloc_trim()) is not None:
        trim(0)
