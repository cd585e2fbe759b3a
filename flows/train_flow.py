"""Train a recurrent language model end to end: `python flows/train_flow.py --help`.

download -> tokenize + vocab -> train -> sample -> log to MLflow -> register. With no arguments this is the book's
experiment (D2L 8.6). Every option is a field of `rnnlm.config.TrainConfig`, the flow's one parameter.
"""

# No `from __future__ import annotations` here: Prefect builds the parameter form from these annotations and,
# on a Dask worker, cannot resolve them from strings.
import sys

from flows.cli import parse_command, run_command, run_script, start_temporary_server
from flows.train_command import TrainCommand

# Run as a script, the command line is read first (a bad option ends here, before anything starts); then Prefect's
# temporary server boots on another core while the imports below load (about 3 s saved).
_command = parse_command(TrainCommand, engine=True) if __name__ == "__main__" else None
_server_ready = start_temporary_server() if _command is not None else lambda: None

from prefect import flow  # imported after the server's start on purpose (E402 allowed in pyproject.toml)

from flows.deploy import serve_training
from rnnlm.config import TrainConfig
from rnnlm.data import preflight
from tasks.data import fetch_corpus, prepare_data
from tasks.mlflow_run import check_tracking, log_results, register_model, start_run
from tasks.registry import promote, read_versions
from tasks.report import plot_history, report
from tasks.train import generate_samples, train_model
from tracking.runs import run_guard

__all__ = ["TrainCommand", "main", "train_flow"]  # TrainCommand lives in flows.train_command, light to import


@flow(name="train-rnnlm", flow_run_name="{config.rnn}-{config.num_hiddens}h-{config.num_epochs}ep", log_prints=True)
def train_flow(config: TrainConfig = TrainConfig(), parent_run_id: str | None = None) -> dict:  # noqa: B008
    """Train, evaluate, sample, log to MLflow and register one model; returns the run id, version and metrics.

    `parent_run_id` nests the MLflow run under another (a sweep's)."""
    preflight(config)  # a local corpus that cannot serve these options fails here, before anything starts
    tracking_uri = check_tracking(config)
    corpus_path = fetch_corpus(config)
    data = prepare_data(corpus_path, config)
    tracked = start_run(config, data, parent_run_id)
    run_id = tracked.run_id
    with run_guard(tracked):
        result = train_model(config, data, tracked)
        samples = generate_samples(config, result, data)
        plot = plot_history(config, run_id, result)
        log_results(run_id, result, samples, plot, str(data.vocab_path))
        report(config, run_id, result, samples, tracking_uri)
        version = register_model(config, run_id, result)
    print(f"MLflow run {run_id}; registered model {config.registered_model!r} version {version}")
    if config.promote:
        promote(config.registered_model, read_versions(config.registered_model), config.promote_margin)
    return {"run_id": run_id, "version": version, **result.summary()}


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and run the flow; a bad option or input ends with one line, `error: ...`, and
    status 1, before any expensive work where it can be seen beforehand."""
    command = _command if argv is None and _command is not None else parse_command(TrainCommand, argv, engine=True)
    if command.cron and not command.serve:
        sys.exit("error: --cron schedules the deployment made by --serve; add --serve (see --help)")
    if command.serve:
        # the flow as `flows.train_flow.train_flow`, not as this script's `__main__`: Prefect pickles the flow for
        # each served run, and a flow found by its module's name travels by reference
        from flows.train_flow import train_flow as importable_flow

        serve_training(importable_flow, command.config(), cron=command.cron)
        return {}
    config = command.config()
    run_command(lambda: preflight(config))  # a wrong path or split ends here, before Prefect and MLflow start
    _server_ready()
    return run_command(lambda: train_flow(config))


if __name__ == "__main__":
    run_script(main)
