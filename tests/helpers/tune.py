"""A search of a few seconds, for the tests of the tune flow (tests/pipeline, tests/services)."""

from __future__ import annotations

from pathlib import Path

from helpers import SMALL_TRAINING, small_text


def tiny_search(tmp_path: Path, space: str, changes: dict | None = None, **overrides):
    """A TuneConfig over a small corpus and recipe written here (with `changes`): trials of 6 quick epochs,
    3 of them."""
    from flows.tune_flow import TuneConfig
    from rnnlm.search import to_toml

    corpus = tmp_path / "small.txt"
    corpus.write_text(small_text(2500))
    recipe = tmp_path / "base.toml"
    base = SMALL_TRAINING | {"num_epochs": 6, "cache_dir": str(tmp_path / "cache"), "device": "cpu"} | (changes or {})
    recipe.write_text(to_toml(base))
    (tmp_path / "space.toml").write_text(space)
    settings = dict(
        config_file=str(recipe), corpus=str(corpus), space=str(tmp_path / "space.toml"), trial_minutes=0.5,
        final_minutes=1.0, max_minutes=30, n_trials=3, study_name="tiny", recipe_out=str(tmp_path / "best.toml"),
        base_trial=False,
    )  # fmt: skip
    return TuneConfig(**settings | overrides)
