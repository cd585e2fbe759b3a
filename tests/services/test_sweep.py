"""The sweep: members in parallel, nested MLflow runs, a table beside the book; on threads and on real Dask."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import small_config, small_text
from mlflow.tracking import MlflowClient

from flows.sweep_flow import BOOK_TABLE, SweepConfig, Variant, run_sweep
from rnnlm.config import TrainConfig
from tasks.sweep import sweep_table

pytestmark = pytest.mark.usefixtures("prefect_harness")


def tiny_base(tmp_path) -> TrainConfig:
    corpus = tmp_path / "small.txt"
    corpus.write_text(small_text(2500))
    return small_config(tmp_path, corpus)


def test_default_sweep_is_the_books_table():
    members = SweepConfig().members()
    assert [(m.rnn, m.num_layers, m.lr, m.max_tokens) for m in members[:4]] == [
        ("rnn", 1, 1.0, 10_000),
        ("gru", 1, 1.0, 10_000),
        ("lstm", 1, 1.0, 10_000),
        ("lstm", 2, 2.0, 10_000),
    ]
    assert [m.max_tokens for m in members[4:]] == [-1] * 4 and len(members) == 2 * len(BOOK_TABLE)
    assert all(m.num_hiddens == 256 and m.num_epochs == 500 and m.batch_size == 32 for m in members)


def test_table_puts_the_books_numbers_beside_ours():
    members = SweepConfig().members()[:2]
    results = [
        {
            "train_perplexity": 1.31,
            "val_perplexity": 9.5,
            "tokens_per_sec": 1e5,
            "device": "cpu",
            "run_id": "a",
            "version": 1,
        },
        RuntimeError("boom"),
    ]
    table = sweep_table(members, results)
    assert list(table["book_train_ppl"]) == [1.3, 1.0]
    assert table.loc[0, "train_ppl"] == 1.31 and "boom" in table.loc[1, "error"]


def _check_sweep(records, store_uri, names):
    client = MlflowClient(store_uri)
    assert [r["model"] for r in records] == names and all(not r["error"] for r in records)
    parent = client.get_run(client.get_run(records[0]["run_id"]).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.params["members"] == str(len(names))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.csv", "sweep.md"}
    for record in records:
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert client.get_model_version("rnnlm", str(record["version"])).run_id == record["run_id"]


@pytest.mark.slow
def test_sweep_on_local_threads(tmp_path, mlflow_store):
    sweep = SweepConfig(base=tiny_base(tmp_path), variants=[Variant(rnn="gru"), Variant(rnn="lstm", num_layers=2)])
    records = run_sweep(sweep)
    _check_sweep(records, mlflow_store, ["GRU", "LSTM x2"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path, mlflow_store):
    """A real Dask scheduler and two workers, as separate processes on loopback (after `mlflow_store`, so that
    the workers inherit its MLFLOW_TRACKING_URI). The first worker declares one 'GPU' resource, as a worker on a GPU
    machine would (`dask worker ... --resources GPU=1`); Dask treats resources as labels, so no GPU is needed."""
    port, bin_dir = _free_port(), os.path.dirname(sys.executable)
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [
        subprocess.Popen(
            [f"{bin_dir}/dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    procs += [
        subprocess.Popen(
            [
                f"{bin_dir}/dask",
                "worker",
                address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(tmp_path / f"w{i}"),
                *(["--resources", "GPU=1"] if i == 0 else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"w{i}.log", "w"),
        )
        for i in range(2)
    ]
    from distributed import Client

    deadline = time.time() + 120
    with Client(address, timeout=120) as client:
        while len(client.scheduler_info()["workers"]) < 2:
            assert time.time() < deadline, "dask workers did not join"
            time.sleep(0.5)
    yield address
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


@pytest.mark.slow
def test_sweep_on_a_real_dask_cluster(tmp_path, mlflow_store, dask_cluster):
    sweep = SweepConfig(
        base=tiny_base(tmp_path), variants=[Variant(rnn="rnn"), Variant(rnn="gru")], dask_address=dask_cluster
    )
    records = run_sweep(sweep)
    _check_sweep(records, mlflow_store, ["RNN", "GRU"])


@pytest.mark.slow
def test_members_that_need_a_gpu_run_only_on_gpu_workers(tmp_path, mlflow_store, dask_cluster):
    from distributed import Client

    sweep = SweepConfig(
        base=tiny_base(tmp_path),
        variants=[Variant(rnn="rnn"), Variant(rnn="gru")],
        dask_address=dask_cluster,
        gpus_per_member=1,
    )
    records = run_sweep(sweep)
    _check_sweep(records, mlflow_store, ["RNN", "GRU"])
    with Client(dask_cluster, timeout=60) as client:
        workers = client.scheduler_info()["workers"]
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    gpu_worker = next(addr for addr, info in workers.items() if info["resources"].get("GPU"))
    assert executed[gpu_worker] >= 2  # both members, one GPU each, one after the other
    assert all(count == 0 for addr, count in executed.items() if addr != gpu_worker), executed
