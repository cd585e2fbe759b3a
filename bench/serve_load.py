"""Serving under load: the real `mlflow models serve` of a registered model on loopback, C concurrent clients, then
large allowed requests and hostile ones, and the server's resident memory before and after them.

Each client sends `--requests` requests one after the other, one prompt and `--num_preds` generated characters each,
greedy and then sampled (temperature 0.8, top-5, its own seed per request). Printed per run: requests/s, generated
characters/s, p50 and p99 latency, errors; then each large or hostile request's status, time and message, and the
resident memory (VmRSS from /proc/<pid>/status) of the server's processes. Without `--model` it trains a model of the
book's size (RNN, 256 hidden units; a few epochs: speed does not depend on the weights) and registers it in a
temporary MLflow store.

    .venv/bin/python bench/serve_load.py
    .venv/bin/python bench/serve_load.py --model models:/rnnlm@champion --tracking_uri sqlite:///$PWD/mlruns/mlflow.db
    .venv/bin/python bench/serve_load.py --workers 2 --clients 1,8,32 --requests 50
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.environment import QUIET_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"
PROMPTS = ["time traveller", "the machine", "it was", "the time traveller said", "we", "a"]
SAMPLED = {"temperature": 0.8, "top_k": 5}


def register_book_model(folder: Path, corpus: str | None, epochs: int) -> tuple[str, str]:
    """Train an RNN of the book's size for `epochs` epochs on `corpus` (None: the book's, downloaded) and register it
    in a new store in `folder`; returns the model URI and the tracking URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from prefect.logging import disable_run_logger

    from rnnlm.config import TrainConfig
    from rnnlm.data import fetch, prepare_data
    from rnnlm.run import fit
    from tasks.mlflow_run import register_model
    from tracking import store

    settings = {"num_epochs": epochs, "eval_every": epochs, "cache_dir": str(folder / "cache")}
    config = TrainConfig(**settings, **({"corpus": corpus} if corpus else {}))
    result = fit(config, prepare_data(fetch(config), config), folder / "model.pt")
    run_id = store.client().create_run(store.experiment_id(config.experiment)).info.run_id
    with disable_run_logger():  # the task's body, outside a flow
        version = register_model.fn(config, run_id, result)
    return f"models:/{config.registered_model}/{version}", uri


@contextmanager
def model_server(model: str, tracking_uri: str, log: Path, workers: int) -> Iterator[tuple[str, int]]:
    """The real `mlflow models serve -w workers` of `model` (this environment's packages) on a free loopback port, in
    a process group of its own; yields its URL and the group's id, and ends the whole group afterwards."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    env = os.environ | QUIET_DEFAULTS | {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's uvicorn
    serve = ["mlflow", "models", "serve", "-m", model, "--env-manager", "local", "-w", str(workers)]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*serve, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while not _pings(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not come up:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _pings(port: int) -> bool:
    """Whether the server on `port` answers its /ping with 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def post(port: int, body: bytes, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes, float]:
    """POST a body to /invocations; returns status, response body and seconds."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start_time = time.perf_counter()
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read(), time.perf_counter() - start_time


def cpu_ticks(pids: list[int]) -> tuple[int, int, int]:
    """CPU clock ticks so far: all CPUs busy, all CPUs in all, and the server's processes plus this one."""
    times = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ours = round(sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK"))
    for pid in pids:  # utime and stime, after the command's name (which may hold spaces)
        ours += sum(int(n) for n in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    return sum(times) - times[3] - times[4], sum(times), ours  # busy: all but idle and iowait


def load(port: int, clients: int, requests: int, params: dict, pids: list[int]) -> dict:
    """`clients` threads, each sending `requests` one-prompt requests in turn; latencies, errors, wall time, and the
    share of all CPUs that processes other than the server and this one used meanwhile."""
    latencies, errors = [], []

    def client(number: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in range(requests):
            prompt = PROMPTS[(number + i) % len(PROMPTS)]
            body = json.dumps({"inputs": [prompt], "params": {**params, "seed": number * requests + i}}).encode()
            status, text, seconds = post(port, body, conn)
            latencies.append(seconds)
            if status != 200:
                errors.append(f"{status} {text[:200]!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began, ticks = time.perf_counter(), cpu_ticks(pids)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy, total, ours = (after - before for after, before in zip(cpu_ticks(pids), ticks, strict=True))
    wall, others = time.perf_counter() - began, max(busy - ours, 0) / total
    return {"latencies": sorted(latencies), "errors": errors, "wall": wall, "others": others}


def print_load(label: str, clients: int, result: dict, num_preds: int) -> float:
    """One line of the load table; returns the generated characters/s."""
    latencies, wall = result["latencies"], result["wall"]
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    chars = len(latencies) * num_preds / wall
    print(
        f"{label:8} {clients:>7} {len(latencies):>8} {len(latencies) / wall:>10.1f} {chars:>12,.0f} "
        f"{statistics.median(latencies) * 1e3:>8.0f} {p99 * 1e3:>8.0f} {len(result['errors']):>6} "
        f"{result['others']:>7.0%}"
    )
    for error in result["errors"][:3]:
        print("    error:", error)
    return chars


def large_requests() -> dict[str, dict]:
    """Requests at the edge of the default budget (256 prompts, 100,000 tokens of work): all allowed."""
    return {
        "1 prompt x 10,000 chars": {"inputs": ["time traveller"], "params": {"num_preds": 10_000}},
        "9 prompts x 10,000 chars, sampled": {"inputs": ["the"] * 9, "params": {"num_preds": 10_000, **SAMPLED}},
        "256 prompts x 300 chars": {"inputs": PROMPTS * 42 + PROMPTS[:4], "params": {"num_preds": 300}},
        "a 90,000-character prompt": {"inputs": ["the time machine " * 5294], "params": {"num_preds": 100}},
    }


def hostile_requests() -> dict[str, bytes]:
    """The requests of issue 17 that one-at-a-time serving accepted (or answered 500), and other bad bodies."""
    depth = 100_000
    return {
        "20,000 prompts": json.dumps({"inputs": ["time traveller"] * 20_000, "params": {"num_preds": 100}}).encode(),
        "64 prompts x 10,000 chars": json.dumps({"inputs": ["the"] * 64, "params": {"num_preds": 10_000}}).encode(),
        "a 1 MB prompt": json.dumps({"inputs": ["the time machine " * 58_824], "params": {"num_preds": 10}}).encode(),
        "a 2 MB body": json.dumps({"inputs": ["time"] * 400_000}).encode(),
        "JSON nested 100,000 deep": ('{"inputs": ' + "[" * depth + "]" * depth + "}").encode(),
        "params nested 100,000 deep": (
            '{"inputs": ["a"], "params": ' + '{"a":' * depth + "1" + "}" * depth + "}"
        ).encode(),
        "malformed JSON": b'{"inputs": ["time traveller"',
        "not UTF-8": b'{"inputs": ["\xff\xfe"]}',
        "a list, not an object": b'["time traveller"]',
        "prompts not strings": b'{"inputs": [1, 2, 3]}',
        "inputs an object": b'{"inputs": {"a": "b"}}',
        "num_preds a string": b'{"inputs": ["time"], "params": {"num_preds": "many"}}',
        "temperature a list": b'{"inputs": ["time"], "params": {"temperature": [1]}}',
        "params not an object": b'{"inputs": ["time"], "params": [1, 2]}',
    }


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together (VmRSS), in MB."""
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def server_pids(group: int) -> list[int]:
    """The processes `mlflow models serve` (leading process group `group`) started: uvicorn and its workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != group and os.getpgid(int(entry.name)) == group:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return sorted(pids)


def send_each(port: int, requests: dict[str, bytes]) -> None:
    """Send requests one at a time; print each one's status, time and (short) message."""
    for name, body in requests.items():
        status, text, seconds = post(port, body)
        message = text.decode(errors="replace")
        if status != 200:
            message = json.loads(text).get("message", message) if text.startswith(b"{") else message
        print(f"  {name:36} {status:>4} {seconds:7.3f} s  {message[:110]!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a registered model URI (default: train and register one)")
    parser.add_argument("--tracking_uri", help="the MLflow store holding --model")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS) if DEFAULT_CORPUS.exists() else None)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the model made without --model")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per run, comma-separated")
    parser.add_argument("--requests", type=int, default=40, help="requests per client")
    parser.add_argument("--num_preds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of `mlflow models serve`")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rnnlm-serve-load-") as tmp:
        folder = Path(tmp)
        if args.model:
            model, uri = args.model, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        else:
            model, uri = register_book_model(folder, args.corpus, args.epochs)
        with model_server(model, uri, folder / "serve.log", args.workers) as (url, group):
            run_all(args, int(url.rsplit(":", 1)[1]), server_pids(group), model)


def run_all(args, port: int, pids: list[int], model: str) -> None:
    """The load table, then memory around the large and hostile requests."""
    print(f"{model} served by `mlflow models serve -w {args.workers}` (pids {pids}), {os.cpu_count()} CPUs")
    print(f"{args.requests} requests per client, 1 prompt and {args.num_preds} generated characters each")
    columns = f"{'clients':>7} {'requests':>8} {'req/s':>10} {'chars/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    print(f"{'':8} {columns} {'others':>7}  (others: the CPUs' share used meanwhile by other processes)")
    for label, params in (("greedy", {}), ("sampled", SAMPLED)):
        rates = {}
        for clients in map(int, args.clients.split(",")):
            result = load(port, clients, args.requests, {"num_preds": args.num_preds, **params}, pids)
            rates[clients] = print_load(label, clients, result, args.num_preds)
        if len(rates) > 1:
            low, high = min(rates), max(rates)
            print(f"{'':8} {high} clients / {low}: {rates[high] / rates[low]:.1f}x the characters/s")
    before = rss_mb(pids)
    print(f"resident memory before the large and hostile requests: {before:,.0f} MB")
    print("large allowed requests:")
    send_each(port, {name: json.dumps(body).encode() for name, body in large_requests().items()})
    print("hostile requests:")
    send_each(port, hostile_requests())
    status, _, seconds = post(port, json.dumps({"inputs": ["time traveller"], "params": {"num_preds": 100}}).encode())
    print(f"  a normal request afterwards: {status} in {seconds:.3f} s")
    after = rss_mb(pids)
    print(f"resident memory after: {after:,.0f} MB ({(after - before) / before:+.1%})")


if __name__ == "__main__":
    main()
