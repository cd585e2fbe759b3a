"""The perplexity curve as a PNG: training perplexity every epoch, validation where it was measured."""

from __future__ import annotations

from pathlib import Path


def plot_perplexity(history: list[dict], path: Path, title: str = "") -> Path:
    """Draw train (and validation) perplexity against epoch, log-scaled, into `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; chosen here, not at import time
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([h["epoch"] for h in history], [h["train_perplexity"] for h in history], label="train")
    val = [h for h in history if h.get("val_perplexity") is not None]
    if val:
        ax.plot([h["epoch"] for h in val], [h["val_perplexity"] for h in val], "o-", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
