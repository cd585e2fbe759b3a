"""The champion/challenger decision (pure: no MLflow) and the comparison table."""

from __future__ import annotations

import math

import pytest

from rnnlm.promotion import Candidate, decide
from tracking.versions import comparison_table, to_markdown

BOOK = ("abc", "book", "char")


def cand(version: int, val: float | None, data=BOOK) -> Candidate:
    return Candidate(version, val, *data)


def test_first_champion_is_best_on_newest_data():
    decision = decide([cand(1, 9.0), cand(2, 7.0), cand(3, 8.0)], champion=None)
    assert (decision.champion, decision.challenger, decision.promoted) == (2, 3, True)
    assert decision.reasons[2].startswith("promoted to champion: no champion yet")
    assert decision.reasons[3].startswith("not promoted: v2 has lower")


def test_better_version_replaces_champion():
    decision = decide([cand(1, 9.0), cand(2, 8.0)], champion=1)
    assert (decision.champion, decision.challenger, decision.promoted) == (2, 2, True)
    assert "promoted to champion" in decision.reasons[2]
    assert decision.reasons[1].startswith("replaced as champion by v2")


def test_margin_keeps_champion_and_says_why():
    decision = decide([cand(1, 9.0), cand(2, 8.9)], champion=1, margin=0.05)
    assert (decision.champion, decision.challenger, decision.promoted) == (1, 2, False)
    assert decision.reasons[2].startswith("not promoted: validation perplexity 8.9000 vs champion v1's 9.0000")
    assert "margin 5.00%" in decision.reasons[2]
    assert decide([cand(1, 9.0), cand(2, 8.0)], champion=1, margin=0.05).champion == 2


def test_newest_version_worse_than_best_challenger_says_so():
    decision = decide([cand(1, 9.0), cand(2, 9.5), cand(3, 12.0)], champion=1)
    assert (decision.champion, decision.challenger, decision.promoted) == (1, 3, False)
    assert decision.reasons[3] == (
        "not promoted: validation perplexity 12.0000; the best challenger on the same data, v2 (9.5000), "
        "does not beat champion v1 (9.0000)"
    )
    assert decision.reasons[2].startswith(
        "not promoted: validation perplexity 9.5000 vs champion v1's 9.0000 (5.56% higher"
    )


def test_equal_perplexity_is_no_improvement():
    assert decide([cand(1, 9.0), cand(2, 9.0)], champion=1).champion == 1


def test_other_corpus_or_tokenization_never_competes():
    other_corpus, words = ("zzz", "book", "char"), ("abc", "book", "word")
    decision = decide([cand(1, 9.0), cand(2, 1.0, other_corpus), cand(3, 2.0, words)], champion=1)
    assert (decision.champion, decision.challenger, decision.promoted) == (1, 3, False)
    assert decision.reasons[3].startswith("not compared with champion v1: trained on corpus abc")
    assert "word tokens" in decision.reasons[3]


def test_versions_without_validation_do_not_compete():
    decision = decide([cand(1, None)], champion=None)
    assert (decision.champion, decision.challenger, decision.promoted) == (None, 1, False)
    assert "no validation perplexity" in decision.reasons[1]
    assert decide([cand(1, 9.0), cand(2, math.nan)], champion=1).champion == 1


def test_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin"):
        decide([cand(1, 9.0)], champion=None, margin=-0.1)


def test_table_is_sorted_by_validation_perplexity():
    records = [
        {"version": 1, "val_perplexity": 9.0, "aliases": ""},
        {"version": 2, "val_perplexity": None, "aliases": ""},
        {"version": 3, "val_perplexity": 7.5, "aliases": "champion"},
    ]
    table = comparison_table(records)
    assert list(table["version"]) == [3, 1, 2]
    header, _, best, *_ = ([cell.strip() for cell in line.split("|")] for line in to_markdown(table).splitlines())
    assert header[1:4] == ["version", "aliases", "val_perplexity"]
    assert best[1] == "3" and "champion" in best
