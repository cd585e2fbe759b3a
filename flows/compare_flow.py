"""Compare every registered version, optionally promote the best: `python flows/compare_flow.py --help`.

Prints the versions ranked by validation bits per byte among those of the champion's held-out text (the others
unranked, with why), publishes the table in the Prefect UI (artifact `registry-comparison`) and in MLflow
(`comparison.csv` and `comparison.md` in a run of the `rnnlm-compare` experiment). With `--promote`, the best version
on the champion's held-out text becomes `champion` if it beats it by more than `--promote_margin`, and the newest
version becomes `challenger`.
"""

from typing import Annotated

from prefect import flow
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.cli import parse_command, run_command
from tasks.registry import promote, publish_comparison, read_versions


@flow(name="compare-rnnlm", flow_run_name="compare-{registered_model}", log_prints=True)
def compare_flow(
    registered_model: str = "rnnlm",
    promote_best: bool = False,
    promote_margin: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    experiment: str = "rnnlm-compare",
) -> dict:
    """Compare the versions of `registered_model`; promote first when `promote_best`; returns the decision and table."""
    records = read_versions(registered_model)
    decision = promote(registered_model, records, promote_margin) if promote_best and records else None
    if decision is not None:
        records = read_versions(registered_model)  # the aliases have moved
    run_id = publish_comparison(registered_model, records, experiment) if records else None
    return {"decision": decision, "records": records, "mlflow_run_id": run_id}


class CompareCommand(BaseSettings):
    """The command line of the compare flow."""

    model_config = SettingsConfigDict(
        env_prefix="RNNLM_", cli_prog_name="python flows/compare_flow.py", cli_implicit_flags=True, extra="forbid"
    )

    registered_model: str = Field("rnnlm", min_length=1, description="MLflow registered model name.")
    promote: bool = Field(False, description="Move the champion/challenger aliases before printing the table.")
    promote_margin: float = Field(
        0.0, ge=0, lt=1, description="Fraction by which the best version must beat the champion (0 = any improvement)."
    )
    experiment: str = Field("rnnlm-compare", min_length=1, description="MLflow experiment for the comparison table.")


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and run the flow."""
    command = parse_command(CompareCommand, argv)
    return run_command(
        lambda: compare_flow(command.registered_model, command.promote, command.promote_margin, command.experiment)
    )


if __name__ == "__main__":
    main()
