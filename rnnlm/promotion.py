"""Which registered version should be the champion: a pure decision over plain records, no MLflow here.

A version competes only with versions trained on the same data: same corpus file (sha1), same preprocessing and same
tokenization. Perplexities of a character model and a word model, or of two corpora, do not measure the same thing.
The best version by validation perplexity replaces the champion only when it beats it by more than `margin`
(a fraction: 0.02 means at least 2 % lower perplexity; 0 means any improvement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One registered version as the decision sees it."""

    version: int
    val_perplexity: float | None
    corpus_sha1: str | None
    preprocess: str | None
    tokenization: str | None

    def data_key(self) -> tuple:
        """What must be equal for two versions to be compared."""
        return (self.corpus_sha1, self.preprocess, self.tokenization)

    def has_score(self) -> bool:
        """True when there is a finite validation perplexity to compare."""
        return self.val_perplexity is not None and math.isfinite(self.val_perplexity)


@dataclass(frozen=True)
class Decision:
    """The outcome: the champion and challenger versions, and one sentence per version explaining what happened."""

    champion: int | None
    challenger: int | None
    promoted: bool
    reasons: dict[int, str] = field(default_factory=dict)


def describe_data(candidate: Candidate) -> str:
    """The data a version was trained on, for messages."""
    sha1 = (candidate.corpus_sha1 or "?")[:10]
    return f"corpus {sha1}, {candidate.preprocess} preprocessing, {candidate.tokenization} tokens"


def decide(candidates: list[Candidate], champion: int | None, margin: float = 0.0) -> Decision:
    """Pick the champion and challenger among `candidates`, given the current champion version (or None).

    The newest version becomes the challenger. With a champion, only versions on the champion's data compete and the
    best must beat it by more than `margin`; without one, the best version on the newest version's data wins.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not candidates:
        return Decision(champion=champion, challenger=None, promoted=False)
    by_version = {c.version: c for c in candidates}
    newest = by_version[max(by_version)]
    current = by_version.get(champion) if champion is not None else None
    if current is None or not current.has_score():
        return _first_champion(candidates, newest)
    return _challenge(candidates, current, newest, margin)


def _first_champion(candidates: list[Candidate], newest: Candidate) -> Decision:
    """No champion (or one without a score): the best version on the newest version's data becomes champion."""
    pool = [c for c in candidates if c.data_key() == newest.data_key() and c.has_score()]
    if not pool:
        reason = "not promoted: no validation perplexity to compare (trained with val_tokens=0?)"
        return Decision(champion=None, challenger=newest.version, promoted=False, reasons={newest.version: reason})
    best = min(pool, key=lambda c: (c.val_perplexity, -c.version))
    reasons = {
        c.version: f"not promoted: v{best.version} has lower validation perplexity on the same data "
        f"({best.val_perplexity:.4f} < {c.val_perplexity:.4f})"
        for c in pool
        if c is not best
    }
    reasons[best.version] = (
        f"promoted to champion: no champion yet; best validation perplexity {best.val_perplexity:.4f} "
        f"of {len(pool)} version(s) on {describe_data(best)}"
    )
    return Decision(champion=best.version, challenger=newest.version, promoted=True, reasons=reasons)


def _challenge(candidates: list[Candidate], current: Candidate, newest: Candidate, margin: float) -> Decision:
    """A champion exists: the best other version on the same data must beat it by more than `margin`."""
    reasons: dict[int, str] = {}
    if newest.data_key() != current.data_key():
        reasons[newest.version] = (
            f"not compared with champion v{current.version}: trained on {describe_data(newest)}, "
            f"the champion on {describe_data(current)}"
        )
    pool = [c for c in candidates if c.data_key() == current.data_key() and c.has_score() and c is not current]
    if not pool:
        return Decision(champion=current.version, challenger=newest.version, promoted=False, reasons=reasons)
    best = min(pool, key=lambda c: (c.val_perplexity, -c.version))
    threshold = current.val_perplexity * (1 - margin)
    gain = 1 - best.val_perplexity / current.val_perplexity
    change = f"{gain:.2%} lower" if gain >= 0 else f"{-gain:.2%} higher"
    versus = (
        f"validation perplexity {best.val_perplexity:.4f} vs champion v{current.version}'s "
        f"{current.val_perplexity:.4f} ({change}; margin {margin:.2%})"
    )
    if best.val_perplexity < threshold:
        reasons[best.version] = f"promoted to champion: {versus}"
        reasons[current.version] = f"replaced as champion by v{best.version}: {versus}"
        return Decision(champion=best.version, challenger=newest.version, promoted=True, reasons=reasons)
    reasons[best.version] = f"not promoted: {versus}"
    if newest is not best and newest.version not in reasons and newest is not current:
        score = f"validation perplexity {newest.val_perplexity:.4f}" if newest.has_score() else "no validation score"
        reasons[newest.version] = (
            f"not promoted: {score}; the best challenger on the same data, v{best.version} "
            f"({best.val_perplexity:.4f}), does not beat champion v{current.version} ({current.val_perplexity:.4f})"
        )
    return Decision(champion=current.version, challenger=newest.version, promoted=False, reasons=reasons)
