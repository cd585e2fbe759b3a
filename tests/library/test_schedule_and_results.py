"""The learning-rate rule and a fit's result as plain objects: what the schedule gives at each moment, and the
metrics and tags a result lists for the tracking store and the flow."""

from __future__ import annotations

import math

import pytest

from rnnlm.config import TrainConfig
from rnnlm.run import FitResult
from rnnlm.schedule import Schedule


def test_the_constant_schedule_keeps_the_books_rate_at_every_moment():
    schedule = Schedule(TrainConfig(lr=0.5), total_steps=100)
    lr = schedule.rate("start", None, 0, 0.0)
    assert lr == 0.5
    assert [schedule.rate(m, lr, 7, 1.0) for m in ("step", "improved", "stale")] == [0.5, 0.5, 0.5]


def test_cosine_warms_up_then_falls_to_lr_min_and_ignores_evaluations():
    config = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_steps=4, lr_min=0.1)
    schedule = Schedule(config, total_steps=104)
    assert schedule.rate("start", None, 0, 0.0) == pytest.approx(0.25)  # the first of 4 warmup steps
    assert schedule.rate("step", 0.25, 3, 0.0) == pytest.approx(1.0)
    assert schedule.rate("step", 1.0, 54, 0.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert schedule.rate("step", 0.3, 104, 0.0) == pytest.approx(0.1)
    assert schedule.rate("stale", 0.3, 60, 0.0) == 0.3  # evaluations do not move it


def test_plateau_divides_the_rate_after_a_stale_evaluation_only():
    schedule = Schedule(TrainConfig(lr=2.0, lr_schedule="plateau", lr_decay=4.0), total_steps=100)
    lr = schedule.rate("start", None, 0, 0.0)
    assert schedule.rate("step", lr, 1, 0.0) == 2.0 and schedule.rate("improved", lr, 1, 0.0) == 2.0
    assert schedule.rate("stale", lr, 1, 0.0) == 0.5
    assert schedule.rate("stale", 0.5, 2, 0.0) == 0.125


def test_a_resumed_training_starts_at_its_saved_rate():
    for kind in ("constant", "cosine", "plateau"):
        assert Schedule(TrainConfig(lr_schedule=kind), total_steps=10).rate("start", 0.0123, 5, 9.0) == 0.0123


def _result(**overrides) -> FitResult:
    values = dict(
        epochs=3, resumed_from_epoch=0, train_perplexity=1.5, val_perplexity=9.0, best_val_perplexity=8.0,
        tokens_per_sec=1000.0, train_seconds=2.0, device="cpu", matmuls="float32", engine="torch's layers",
        history=(), checkpoint="m.pt", steps=30, registered="best", registered_checkpoint="best.pt",
        registered_epoch=2, registered_step=20, registered_val_perplexity=8.0,
    )  # fmt: skip
    return FitResult(**{**values, **overrides})


def test_a_result_lists_its_metrics_and_tags_without_the_missing_ones():
    result = _result()
    assert result.metrics()["registered_val_perplexity"] == 8.0 and "registered_test_perplexity" not in result.metrics()
    assert result.tags() == {"device": "cpu", "matmuls": "float32", "engine": "torch's layers",
                             "registered_weights": "best"}  # fmt: skip
    assert _result(stopped="early stopping").tags()["stopped"] == "early stopping"
    assert result.version_tags() == {"val_perplexity": 8.0, "train_perplexity": 1.5, "weights": "best",
                                     "epoch": 2, "step": 20}  # fmt: skip


def test_the_summary_read_back_from_the_store_matches_the_results_own():
    result = _result(registered_test_perplexity=11.0)
    logged = {f"final_{name}": value for name, value in result.metrics().items()}
    back = FitResult.summary_from_logged(logged, result.tags())
    summary = result.summary()
    assert back == {name: summary[name] for name in back} and set(back) >= {"train_perplexity", "device"}
