"""What a search found, for its report: the trials as a table, the params' importance, the search's pictures, and
the verdict in a line (the best, against the base recipe at the same budget)."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pandas as pd

from rnnlm.search import MEASURES
from tracking.study import RUN_ID, RUNG, base_trial


def trials_table(study: optuna.Study, measure: str = "perplexity") -> pd.DataFrame:
    """One row per trial: number, state, rung, budget, its value (validation `measure`), params, MLflow run."""
    rows, column = [], MEASURES[measure][0]
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = {"trial": t.number, "state": t.state.name, "rung": t.user_attrs.get(RUNG, 0)}
        row |= {column: None if t.value is None else round(t.value, 4), "seconds": seconds and round(seconds)}
        row |= {"evaluations": len(t.intermediate_values)} | dict(t.params)
        rows.append(row | {"run_id": t.user_attrs.get(RUN_ID), "note": t.user_attrs.get("reason", "")})
    return pd.DataFrame(rows)


def importances(study: optuna.Study) -> dict[str, float]:
    """The params' importance over the complete trials (Optuna's default evaluator); empty with under two."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a value tried by one trial only makes it say so, for each such param
            return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. no param varies across the complete trials
        return {}


def pictures(study: optuna.Study, folder: Path, weights: dict) -> list[Path]:
    """The search's history, the params' importance and the trials' validation curves as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    made = []
    drawings = {"history.png": plots.plot_optimization_history, "curves.png": plots.plot_intermediate_values}
    if weights:
        drawings["importance.png"] = plots.plot_param_importances
    for name, draw in drawings.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            axes = draw(study)
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.savefig(folder / name, dpi=100, bbox_inches="tight")
        matplotlib.pyplot.close(figure)
        made.append(folder / name)
    return made


def verdict(study: optuna.Study, best: optuna.trial.FrozenTrial, label: str) -> str:
    """What the search found, in a line: the best, and how it compares with the base recipe at the same budget."""
    found = f"best of {study.study_name!r}: trial {best.number} (rung {best.user_attrs.get(RUNG, 0)}), {label} " \
            f"{best.value:.4g}"  # fmt: skip
    base = base_trial(study)
    if base is None or base.user_attrs.get(RUNG) != best.user_attrs.get(RUNG):
        return found
    if base.number == best.number:
        return f"{found}: no configuration beat the base recipe at the final budget; it stays the best"
    return f"{found}, {1 - best.value / base.value:.1%} below the base recipe's {base.value:.4g} at the same budget"
