"""The search space file and the search's budget rule: what is refused before a search starts, conditions,
successive halving, the written recipe."""

from __future__ import annotations

import random

import optuna
import pytest
from helpers import PROJECT_ROOT

from rnnlm.config import TrainConfig, read_recipe
from rnnlm.search import (
    Budgets,
    Job,
    RandomPicker,
    SpaceError,
    TrialRecord,
    best_trial,
    next_job,
    read_space,
    report_step,
    to_toml,
)

KJV_BEST = TrainConfig.from_recipe(PROJECT_ROOT / "recipes" / "kjv-best.toml")


def space(tmp_path, text: str, name: str = "space.toml"):
    path = tmp_path / name
    path.write_text(text)
    return read_space(path)


def test_the_default_space_is_sound_for_its_base_recipe():
    shipped = read_space(PROJECT_ROOT / "recipes" / "spaces" / "real-text.toml")
    shipped.check(KJV_BEST, draws=200)
    rng = random.Random(0)
    for _ in range(50):
        chosen = shipped.draw(RandomPicker(rng), KJV_BEST)
        config = shipped.config(KJV_BEST, chosen)
        assert config.embedding_dim == config.num_hiddens and 0.0005 <= config.lr <= 0.01
        assert config.rnn == "lstm" and config.tie_weights and config.lr_schedule == "cosine"


@pytest.mark.parametrize(
    "text, says",
    [
        ("[hidden_units]\nchoices = [1, 2]\n", "hidden_units: no such option"),
        ("[lr]\nlow = 0.1\nhigh = 0.01\n", "lr: a bad range: low (0.1) must be below high (0.01)"),
        ("[lr]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "lr: log must be true or false, and a log range must start"),
        ("[num_hiddens]\nlow = 16\nhigh = 64.5\n", "num_hiddens: is a whole number"),
        ("[rnn]\nlow = 1\nhigh = 2\n", "rnn: is not a number"),
        ("[lr]\nlow = 0.1\n", "lr: a range needs low and high"),
        ("[lr]\nlo = 0.1\nhigh = 1.0\n", "lr: unknown keys lo"),
        ("[corpus]\nchoices = ['a.txt']\n", "corpus: is not searched"),
        ("[min_freq]\nchoices = [1, 2]\n", "min_freq: changes the text the validation figures are measured on"),
        ("[held_out]\nchoices = ['bytes', 'lines']\n", "held_out: changes the text the validation figures"),
        ("[tie_weights]\nchoices = [true]\nwhen = 'embedding_dim = num_hiddens'\n", "tie_weights: when ="),
        ("[dropout]\nchoices = [0.1]\nwhen = 'rnn == lstm'\n", "dropout: when = 'rnn == lstm': 'lstm' is neither"),
        ("[tie_weights]\nchoices = [true]\nwhen = 'num_layers > 1'\n[num_layers]\nchoices = [1, 2]\n", "after it"),
    ],
)
def test_a_space_file_is_refused_naming_the_field(tmp_path, text, says):
    with pytest.raises(SpaceError, match="space.toml: ") as refused:
        space(tmp_path, text)
    assert says in str(refused.value)


def test_a_space_over_what_a_token_is_ranks_by_bits_per_byte_of_text_held_out_in_bytes(tmp_path):
    """Trials of other tokens compare only on the same held-out text, by bits per byte: a base recipe that holds
    out tokens is refused, naming the field; the other spaces keep perplexity."""
    assert space(tmp_path, "[lr]\nlow = 0.001\nhigh = 0.01\n").measure == "perplexity"
    searched = space(tmp_path, "[tokenization]\nchoices = ['word', 'bpe']\n[bpe_vocab_size]\nchoices = [500, 2000]\n")
    assert searched.measure == "bits_per_byte"
    with pytest.raises(SpaceError, match=r"space.toml: tokenization: .*bits per byte.*held_out = \"bytes\""):
        searched.check(KJV_BEST)  # the recipe holds out 50,000 tokens
    searched.check(KJV_BEST.model_copy(update={"held_out": "bytes"}))


def test_the_hour_space_is_sound_for_its_base_recipe_and_holds_its_values():
    """recipes/spaces/real-text-60min.toml around recipes/kjv-60min-amp.toml: every draw a valid, tied LSTM, and the
    base's own values inside it (so that the base is the search's trial 0 at the hour)."""
    base = TrainConfig.from_recipe(PROJECT_ROOT / "recipes" / "kjv-60min-amp.toml")
    shipped = read_space(PROJECT_ROOT / "recipes" / "spaces" / "real-text-60min.toml")
    shipped.check(base, draws=200)
    rng = random.Random(0)
    for _ in range(50):
        config = shipped.config(base, shipped.draw(RandomPicker(rng), base))
        assert config.embedding_dim == config.num_hiddens in (400, 512, 640) and config.locked_dropout
        assert 0.0 <= config.weight_drop <= 0.4 and config.amp and config.max_minutes == base.max_minutes
    params = shipped.base_params(base)
    assert shipped.config(base, shipped.draw(optuna.trial.FixedTrial(params), base)) == base


def test_the_base_recipes_values_as_a_trials_params_or_which_lie_outside(tmp_path):
    shipped = read_space(PROJECT_ROOT / "recipes" / "spaces" / "real-text.toml")
    params = shipped.base_params(KJV_BEST)
    assert params["lr"] == KJV_BEST.lr and params["num_hiddens"] == KJV_BEST.num_hiddens
    assert "embedding_dim" not in params  # it follows num_hiddens
    assert shipped.config(KJV_BEST, shipped.draw(optuna.trial.FixedTrial(params), KJV_BEST)) == KJV_BEST
    with pytest.raises(SpaceError, match=r"space.toml: the base recipe's lr=0.003 outside the space"):
        space(tmp_path, "[lr]\nlow = 0.01\nhigh = 0.1\n").base_params(KJV_BEST)


def test_values_and_combinations_the_config_refuses_are_found_before_a_search(tmp_path):
    with pytest.raises(SpaceError, match=r"dropout: Input should be less than 1"):
        space(tmp_path, "[dropout]\nlow = 0.2\nhigh = 1.0\n").check(KJV_BEST)
    with pytest.raises(SpaceError, match=r"adaptive_cutoffs must be word ranks rising strictly"):
        space(tmp_path, "[adaptive_cutoffs]\nchoices = [[2000, 6000], [6000, 2000]]\n").check(KJV_BEST)
    untied = "[num_hiddens]\nchoices = [128, 200]\n"  # the recipe ties 200-wide weights: 128 needs its embedding
    with pytest.raises(SpaceError, match=r"tie_weights needs embedding_dim == num_hiddens.*num_hiddens=128"):
        space(tmp_path, untied).check(KJV_BEST)
    space(tmp_path, untied + "[embedding_dim]\nsame_as = 'num_hiddens'\n").check(KJV_BEST)  # the fix: refused no more


def test_a_condition_decides_whether_a_field_is_searched(tmp_path):
    searched = space(
        tmp_path,
        "[num_hiddens]\nchoices = [128, 200]\n[embedding_dim]\nchoices = [128, 200]\n"
        "[tie_weights]\nchoices = [true, false]\nwhen = 'embedding_dim == num_hiddens'\n",
    )
    base = KJV_BEST.model_copy(update={"tie_weights": False})
    searched.check(base)
    draws = [searched.draw(RandomPicker(random.Random(seed)), base) for seed in range(40)]
    assert all(("tie_weights" in d) == (d["embedding_dim"] == d["num_hiddens"]) for d in draws)
    assert any("tie_weights" in d for d in draws) and any("tie_weights" not in d for d in draws)


def test_successive_halving_promotes_a_rungs_best_third_and_then_starts_new_trials():
    budgets = Budgets(trial_minutes=2, final_minutes=10, eta=3)
    assert budgets.top() == 2 and [budgets.minutes(r) for r in range(3)] == [2, 6, 10]
    done = [TrialRecord(n, 0, "COMPLETE", v) for n, v in enumerate([50.0, 40.0, 60.0])]
    assert next_job(done[:2], budgets) == Job(0)  # two at rung 0: no third yet
    assert next_job(done, budgets) == Job(1, promote=1)  # the best of three goes up
    promoted = done + [TrialRecord(3, 1, "RUNNING", None, promoted_from=1)]
    assert next_job(promoted, budgets) == Job(0)  # promoted once only
    pruned = done + [TrialRecord(3, 0, "PRUNED", None)] * 3
    assert next_job(pruned, budgets) == Job(1, promote=1)  # pruned trials are not ranked
    assert Budgets(trial_minutes=10, final_minutes=10).top() == 0


def test_the_best_is_taken_at_the_longest_budget_and_steps_keep_rungs_apart():
    trials = [TrialRecord(0, 0, "COMPLETE", 30.0), TrialRecord(1, 1, "COMPLETE", 35.0), TrialRecord(2, 1, "FAIL")]
    assert best_trial(trials).number == 1  # trained longer: trusted over a better short trial
    assert best_trial([TrialRecord(0, 0, "PRUNED")]) is None
    assert [report_step(0, d) for d in (0.0, 0.15, 1.0)] == [0, 1, 9] and report_step(1, 0.5) == 105


def test_a_written_recipe_reads_back_as_the_same_config(tmp_path):
    options = {"rnn": "gru", "lr": 0.00123, "tie_weights": True, "adaptive_cutoffs": [2000, 6000], "corpus_sha1": None}
    (tmp_path / "r.toml").write_text(to_toml(options, "a comment\non two lines"))
    assert read_recipe(tmp_path / "r.toml") == {k: v for k, v in options.items() if v is not None}


def test_the_pruner_stops_a_new_trial_worse_than_the_median_but_lets_a_promoted_one_run_out():
    """Median pruning acts on rung-0 trials; a trial promoted to a higher rung earned its budget and runs to its
    end (part-way through a long training the median of a few trials is noise); a diverging one stops at any rung."""
    from tracking.study import TrialPruning, make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=make_pruner())
    config = TrainConfig(max_minutes=10)
    for _ in range(2):  # two good trials at each rung, every tenth of their budgets
        good = study.ask()
        for rung in (0, 1):
            for tenth in range(10):
                good.report(100.0, report_step(rung, tenth / 10))
        study.tell(good, 100.0)

    def evaluate(rung: int, perplexity: float) -> None:
        TrialPruning(study.ask(), rung, config)._report(0.35, perplexity)

    with pytest.raises(optuna.TrialPruned, match="worse than the median"):
        evaluate(0, 150.0)
    evaluate(1, 150.0)  # promoted: not pruned
    with pytest.raises(optuna.TrialPruned, match="validation perplexity inf"):
        evaluate(1, float("inf"))
