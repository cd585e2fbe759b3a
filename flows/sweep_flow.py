"""Train the book's chapter 8-9 models as one parallel sweep: `python flows/sweep_flow.py --help`.

Each configuration is its own `train-rnnlm` flow run and MLflow run, nested under one parent run; the sweep ends
with a table beside the book's printed perplexities. Tasks run on local threads (`--max_workers`) or on a Dask
cluster (`--dask_address tcp://host:8786`), where `--gpus_per_member 1` asks Dask for a worker with a GPU resource.
"""

# No `from __future__ import annotations` here: Prefect builds the parameter form from these annotations and,
# on a Dask worker, cannot resolve them from strings.
from contextlib import nullcontext
from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.cli import parse_command, run_command
from flows.train_flow import train_flow
from rnnlm.config import TrainConfig
from tasks.mlflow_run import check_tracking
from tasks.sweep import report_sweep, start_sweep_run, train_member
from tracking.runs import TrackedRun, run_guard


class Variant(BaseModel):
    """What one member of the sweep changes in the base configuration (unset fields keep the base's value)."""

    rnn: Literal["rnn", "gru", "lstm"] | None = Field(None, description="Recurrent layer.")
    num_layers: int | None = Field(None, gt=0, description="Stacked recurrent layers.")
    lr: float | None = Field(None, gt=0, description="SGD learning rate.")
    max_tokens: int | None = Field(None, description="Training tokens; -1 for all but the validation tail.")


BOOK_TABLE = [
    Variant(rnn="rnn", num_layers=1, lr=1.0, max_tokens=10_000),  # D2L 8.6
    Variant(rnn="gru", num_layers=1, lr=1.0, max_tokens=10_000),  # 9.1
    Variant(rnn="lstm", num_layers=1, lr=1.0, max_tokens=10_000),  # 9.2
    Variant(rnn="lstm", num_layers=2, lr=2.0, max_tokens=10_000),  # 9.3, deep LSTM
]


class SweepConfig(BaseModel):
    """A sweep: a base training configuration and the variants to train from it."""

    base: TrainConfig = Field(default_factory=TrainConfig, description="Settings shared by every member.")
    variants: list[Variant] = Field(
        default_factory=lambda: BOOK_TABLE + [v.model_copy(update={"max_tokens": -1}) for v in BOOK_TABLE],
        description="Members: the book's RNN, GRU, LSTM and 2-layer LSTM, on 10,000 tokens and on the full corpus.",
    )
    max_workers: int = Field(2, gt=0, description="Members trained at once on local threads.")
    dask_address: str | None = Field(None, description="Dask scheduler (tcp://host:8786); local threads if unset.")
    gpus_per_member: int = Field(0, ge=0, description="Dask 'GPU' resources each member needs (workers declare them).")
    deployment: str | None = Field(
        None,
        description="Run each member as a flow run of this deployment (e.g. 'train-rnnlm/train-rnnlm') on its work "
        "pool's workers, instead of in this process.",
    )

    def members(self) -> list[TrainConfig]:
        """The full configuration of every member, validated."""
        return [TrainConfig(**(self.base.model_dump() | v.model_dump(exclude_none=True))) for v in self.variants]


@flow(name="sweep-rnnlm", flow_run_name="sweep-{sweep.base.num_epochs}ep")
def sweep_flow(sweep: SweepConfig = SweepConfig()) -> list[dict]:  # noqa: B008
    """Train every member in parallel, then tabulate them beside the book; fails if any member failed."""
    members = sweep.members()
    check_tracking(members[0])
    runner = sweep.deployment or sweep.dask_address or f"threads x{sweep.max_workers}"
    parent = start_sweep_run(members, runner)
    with run_guard(TrackedRun(parent)):
        with _gpu_annotation(sweep.gpus_per_member):
            futures = [train_member.submit(train_flow, config, parent, sweep.deployment) for config in members]
        results = [_outcome(future) for future in futures]
        table = report_sweep(members, results, parent)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(members)} members failed; first: {failed[0]}")
    return table


def _outcome(future):
    """A member's result, or its exception (so one failure does not hide the others' results)."""
    try:
        return future.result()
    except Exception as err:
        return err


def _gpu_annotation(gpus: int):
    if not gpus:
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": gpus})


def task_runner(sweep: SweepConfig):
    """Local threads, or the Dask cluster at `sweep.dask_address`."""
    if sweep.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=sweep.dask_address)
    return ThreadPoolTaskRunner(max_workers=sweep.max_workers)


def run_sweep(sweep: SweepConfig) -> list[dict]:
    """Run the sweep on the task runner it asks for."""
    return sweep_flow.with_options(task_runner=task_runner(sweep))(sweep)


class SweepCommand(BaseSettings, SweepConfig):
    """The command line: `--base.num_epochs 50`, `--variants '[{"rnn": "gru"}]'`, `--dask_address ...`."""

    model_config = SettingsConfigDict(
        env_prefix="RNNLM_SWEEP_",
        cli_prog_name="python flows/sweep_flow.py",
        cli_implicit_flags=True,
        env_nested_delimiter="__",
        extra="forbid",
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the command line and run the sweep."""
    command = parse_command(SweepCommand, argv)
    return run_command(lambda: run_sweep(SweepConfig(**command.model_dump())))


if __name__ == "__main__":
    main()
