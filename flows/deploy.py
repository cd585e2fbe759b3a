"""Schedule training from the Prefect UI: `python flows/train_flow.py --serve [--cron "0 3 * * *"] [options]`.

`flow.serve` creates (or updates) the deployment `train-rnnlm/train-rnnlm` on the Prefect server named by
`PREFECT_API_URL`, with the given training options as its default parameters (the UI shows them as an editable form),
and then runs, in this process, every run the schedule or the UI asks for, until stopped with Ctrl-C.
`prefect.yaml` declares the same deployment for `prefect deploy` with a process work pool.
"""

from __future__ import annotations

import sys

from prefect import Flow

from rnnlm.config import TrainConfig

DEPLOYMENT = "train-rnnlm"


def serve_training(train_flow: Flow, config: TrainConfig, cron: str | None = None, name: str = DEPLOYMENT) -> None:
    """Serve `train_flow` as the deployment `train-rnnlm/<name>` with `config` as its parameters (blocks)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        sys.exit(
            "error: --serve needs a Prefect server: start one with `prefect server start --host 127.0.0.1 "
            "--port 4200` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    train_flow.serve(
        name=name,
        cron=cron,
        parameters={"config": config.model_dump(mode="json")},
        description="Train, evaluate, log to MLflow and register an rnnlm model (D2L 8.6).",
        tags=["rnnlm"],
    )
