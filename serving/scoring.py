"""The served model's changes to MLflow's scoring server (`mlflow models serve`, a FastAPI app under uvicorn), made
in its module's names only, from the model's `load_context` and its first request:
- request threads enough for every request waiting for its batch (`PooledAsyncio`);
- MLflow's request parsing guarded (`guarded`): a 400 instead of MLflow's 500 for JSON nested too deeply, a 413 for
  bodies over `max_body_bytes`, error messages without the copy of the input MLflow puts in them;
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlflow.exceptions import MlflowException

TRIM_AFTER_BYTES = 256 * 1024  # bytes of a body after which freed memory is handed back to the OS
SCORING_APP = "mlflow.pyfunc.scoring_server.app"  # the module `mlflow models serve` runs; it loads the model


def hook_scoring_server(settings: dict[str, int]) -> None:
    """Fit MLflow's scoring server (loading this model now) to batching, in its module's names only: request threads
    enough for every waiting request (`PooledAsyncio`), and its request parsing guarded (`guarded`)."""
    from mlflow.pyfunc import scoring_server

    if not isinstance(scoring_server.asyncio, PooledAsyncio):
        scoring_server.asyncio = PooledAsyncio(settings["threads"])
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
    request waiting for its batch holds its thread, so that pool would cap a batch at 6 requests on 2 cores."""

    def __init__(self, size: int):
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="rnnlm-request")

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def to_thread(self, func, /, *args, **kwargs):
        """`asyncio.to_thread` on this pool."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)


def guarded(invocations: Callable, max_body_bytes: int) -> Callable:
    """MLflow's `invocations(data, content_type, model, input_schema)` (parse a body, predict, answer), with a 413
    for bodies over `max_body_bytes`, a 400 for JSON nested deeper than Python's recursion limit (MLflow's json.loads
    raises RecursionError there, which nothing catches: a 500), short error messages, and freed memory handed back
    to the OS after a large body."""
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    def refuse(status: int, message: str) -> InvocationsResponse:
        body = json.dumps({"error_code": "BAD_REQUEST", "message": message})
        return InvocationsResponse(response=body, status=status, mimetype="application/json")

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
