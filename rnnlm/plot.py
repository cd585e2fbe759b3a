"""The perplexity curve as a PNG: training perplexity every epoch, validation where it was measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rnnlm.state import EpochStats


def plot_perplexity(
    history: Sequence[EpochStats], path: Path, title: str = "", kept: tuple[int, float] | None = None
) -> Path:
    """Draw train (and validation) perplexity against epoch, log-scaled, into `path`, with a star at `kept`
    ((epoch, validation perplexity) of the weights kept as the best). matplotlib's text layout is not safe to run
    twice at once: callers that plot concurrently serialise the calls."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global figure registry, no display needed
    ax = fig.add_subplot()
    ax.plot([h.epoch for h in history], [h.train_perplexity for h in history], label="train")
    val = [h for h in history if h.val_perplexity is not None]
    if val:
        ax.plot([h.epoch for h in val], [h.val_perplexity for h in val], "o-", ms=3, label="validation")
    if kept is not None:
        ax.plot(*kept, "*", ms=12, color="tab:red", label=f"kept: epoch {kept[0]}, {kept[1]:.2f}")
    ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
