"""Score registered versions on any text file: `python flows/evaluate_flow.py --text FILE [--models rnnlm@champion
rnnlm/3 ...]`.

Each version is scored by a task of its own (its preprocessing and tokenization applied to the text): bits per byte,
which compare whatever the tokenization, and perplexity in the model's own unit. Each score is logged to MLflow as
the version's model metrics on the text as a dataset (`tasks/evaluate.py` says why), read back from there into one
table, printed, published in the Prefect UI (artifact `text-scores`) and logged in the evaluation run (experiment
`rnnlm-evaluate`). With `--promote`, the best version on this text becomes `champion` if it beats the champion by
more than `--promote_margin` (the rule of `flows/compare_flow.py`, on this text's scores).
"""

import sys
from typing import Annotated

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.cli import parse_command, run_command
from rnnlm.corpus import check_local
from tasks.evaluate import (
    finish_evaluation_run,
    models_to_score,
    publish_scores,
    score_version,
    start_evaluation_run,
)
from tasks.registry import promote


@flow(
    name="evaluate-rnnlm",
    flow_run_name="evaluate-on-text",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def evaluate_flow(
    text: str,
    models: list[str] | None = None,
    registered_model: str = "rnnlm",
    promote_best: bool = False,
    promote_margin: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    experiment: str = "rnnlm-evaluate",
) -> dict:
    """Score `models` (default: every version of `registered_model`) on the text file `text`; promote on it when
    `promote_best`; returns the table's rows and the decision."""
    text = str(check_local(text).resolve())
    refs = models_to_score(registered_model, models, promote_best)
    run_id = start_evaluation_run(text, experiment)
    scored = [future.result() for future in [score_version.submit(ref, text, run_id) for ref in refs]]
    rows, records = publish_scores(registered_model, text, scored, run_id)
    finish_evaluation_run(run_id, sorted({s["model_id"] for s in scored if s["model_id"]}))
    decision = None
    if promote_best and records:
        decision = promote(registered_model, records, promote_margin)
    return {"rows": rows, "decision": decision, "mlflow_run_id": run_id}


class EvaluateCommand(BaseSettings):
    """The command line of the evaluate flow."""

    model_config = SettingsConfigDict(
        env_prefix="RNNLM_", cli_prog_name="python flows/evaluate_flow.py", cli_implicit_flags=True, extra="forbid"
    )

    text: str = Field(description="The UTF-8 text file to score the models on.")
    models: list[str] = Field(
        [], description="Versions to score, as name@alias or name/version (e.g. rnnlm@champion rnnlm/3); default: all."
    )
    registered_model: str = Field("rnnlm", min_length=1, description="MLflow registered model name.")
    promote: bool = Field(False, description="Make the best version on this text champion (by --promote_margin).")
    promote_margin: float = Field(
        0.0, ge=0, lt=1, description="Fraction by which the best version must beat the champion (0 = any improvement)."
    )
    experiment: str = Field("rnnlm-evaluate", min_length=1, description="MLflow experiment of the evaluation run.")


def spread_models(argv: list[str]) -> list[str]:
    """`--models a b c` as `--models a --models b --models c` (what the parser reads as a list)."""
    spread, listing = [], False
    for arg in argv:
        listing = arg == "--models" or (listing and not arg.startswith("-"))
        spread += ["--models", arg] if listing and arg != "--models" else [] if arg == "--models" else [arg]
    return spread


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and run the flow; a missing text file is one `error:` line."""
    command = parse_command(EvaluateCommand, spread_models(sys.argv[1:] if argv is None else argv))
    run_command(lambda: check_local(command.text))
    return run_command(
        lambda: evaluate_flow(
            command.text, command.models or None, command.registered_model, command.promote,
            command.promote_margin, command.experiment,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
