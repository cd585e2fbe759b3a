"""Which registered version should be the champion: a pure decision over plain records, no MLflow here.

A version competes only with versions scored on the same text: same corpus file (sha1), same preprocessing and the
same held-out text (`held_out`: its byte span in the corpus, or for held-out sizes in tokens, its tokenization and
count), and they are ranked by validation bits per byte, which compare whatever their tokenization: a character and
a BPE model of one held-out text compete. Versions registered before bits per byte were logged have only a
perplexity: they compete with those of the same tokenization only (a character's perplexity and a word's do not
measure the same thing). The best version replaces the champion only when it beats it by more than `margin` (a
fraction: 0.02 means at least 2 % lower; 0 means any improvement). `not_comparable` says why two versions do not
compete.
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
    val_bits_per_byte: float | None = None
    held_out: str | None = None  # which text was held out (see `rnnlm.run.FitResult.held_out_span`)

    def in_bits(self) -> bool:
        """Whether this version is ranked by bits per byte (it has them, and knows its held-out text)."""
        return self.val_bits_per_byte is not None and bool(self.held_out)

    def data_key(self) -> tuple:
        """What must be equal for two versions to be compared."""
        if self.in_bits():
            return ("bits per byte", self.corpus_sha1, self.preprocess, self.held_out)
        return ("perplexity", self.corpus_sha1, self.preprocess, self.tokenization)

    @property
    def score(self) -> float | None:
        """What ranks it, lower is better: validation bits per byte, else validation perplexity."""
        return self.val_bits_per_byte if self.in_bits() else self.val_perplexity

    @property
    def measure(self) -> str:
        """The name of `score`, for messages."""
        if not self.in_bits():
            return "validation perplexity"
        scored_on = self.held_out.removeprefix("all of ")  # a score on a whole text file (flows/evaluate_flow.py)
        return f"bits per byte of {scored_on}" if scored_on != self.held_out else "validation bits per byte"

    def has_score(self) -> bool:
        """True when there is a finite score to compare."""
        return self.score is not None and math.isfinite(self.score)


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
    if candidate.in_bits():
        return f"corpus {sha1}, {candidate.preprocess} preprocessing, held-out text {candidate.held_out}"
    return f"corpus {sha1}, {candidate.preprocess} preprocessing, {candidate.tokenization} tokens"


def not_comparable(a: Candidate, b: Candidate) -> str | None:
    """Why `a` and `b` cannot be ranked against each other (None when they can): each thing that differs."""
    if a.data_key() == b.data_key():
        return None
    found = []
    if a.corpus_sha1 != b.corpus_sha1:
        found.append(f"other corpora ({(a.corpus_sha1 or '?')[:10]} vs {(b.corpus_sha1 or '?')[:10]})")
    if a.preprocess != b.preprocess:
        found.append(f"other preprocessing ({a.preprocess} vs {b.preprocess})")
    if a.in_bits() != b.in_bits():
        old = b if a.in_bits() else a
        found.append(f"v{old.version} has no bits per byte of a known held-out text (only a perplexity)")
    elif a.in_bits() and a.held_out != b.held_out:
        found.append(f"other held-out text ({a.held_out} vs {b.held_out})")
    elif not a.in_bits() and a.tokenization != b.tokenization:
        found.append(f"perplexities of other tokens ({a.tokenization} vs {b.tokenization})")
    return "; ".join(found) or "scored on other data"


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
        reason = "not promoted: no validation perplexity or bits per byte to compare (trained with val_tokens=0?)"
        return Decision(champion=None, challenger=newest.version, promoted=False, reasons={newest.version: reason})
    best = min(pool, key=lambda c: (c.score, -c.version))
    reasons = {
        c.version: f"not promoted: v{best.version} has lower {best.measure} on the same data "
        f"({best.score:.4f} < {c.score:.4f})"
        for c in pool
        if c is not best
    }
    reasons[best.version] = (
        f"promoted to champion: no champion yet; best {best.measure} {best.score:.4f} "
        f"of {len(pool)} version(s) on {describe_data(best)}"
    )
    return Decision(champion=best.version, challenger=newest.version, promoted=True, reasons=reasons)


def _challenge(candidates: list[Candidate], current: Candidate, newest: Candidate, margin: float) -> Decision:
    """A champion exists: the best other version on the same data must beat it by more than `margin`."""
    reasons: dict[int, str] = {}
    if newest.data_key() != current.data_key():
        reasons[newest.version] = (
            f"not compared with champion v{current.version}: trained on {describe_data(newest)}, "
            f"the champion on {describe_data(current)} ({not_comparable(newest, current)})"
        )
    pool = [c for c in candidates if c.data_key() == current.data_key() and c.has_score() and c is not current]
    if not pool:
        return Decision(champion=current.version, challenger=newest.version, promoted=False, reasons=reasons)
    best = min(pool, key=lambda c: (c.score, -c.version))
    threshold = current.score * (1 - margin)
    gain = 1 - best.score / current.score
    change = f"{gain:.2%} lower" if gain >= 0 else f"{-gain:.2%} higher"
    versus = (
        f"{best.measure} {best.score:.4f} vs champion v{current.version}'s "
        f"{current.score:.4f} ({change}; margin {margin:.2%})"
    )
    if best.score < threshold:
        reasons[best.version] = f"promoted to champion: {versus}"
        reasons[current.version] = f"replaced as champion by v{best.version}: {versus}"
        return Decision(champion=best.version, challenger=newest.version, promoted=True, reasons=reasons)
    reasons[best.version] = f"not promoted: {versus}"
    if newest is not best and newest.version not in reasons and newest is not current:
        score = f"{newest.measure} {newest.score:.4f}" if newest.has_score() else "no validation score"
        reasons[newest.version] = (
            f"not promoted: {score}; the best challenger on the same data, v{best.version} "
            f"({best.score:.4f}), does not beat champion v{current.version} ({current.score:.4f})"
        )
    return Decision(champion=current.version, challenger=newest.version, promoted=False, reasons=reasons)
