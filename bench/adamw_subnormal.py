"""What subnormal optimizer state costs a CPU step, and what the trainer's `zero_tiny_state` gives back.

AdamW's running mean of an embedding row whose word has not been seen for some 750 steps is subnormal (below
1.2e-38), and x86 CPUs take a microcode assist for each operation on such a value. This times torch's fused AdamW
step on an embedding of kjv-tuned.toml's shape (12,770 x 400) with `--share` of its rows in that state (18% in a
kjv-tuned checkpoint after two epochs), side by side with the same state after `zero_tiny_state`, alternating, and
prints the medians; `--checkpoint` also counts the subnormal values in a run's checkpoint.

    .venv/bin/python bench/adamw_subnormal.py
    .venv/bin/python bench/adamw_subnormal.py --checkpoint path/to/model.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnnlm.train import TINY_EVERY, zero_tiny_state  # noqa: E402  (the project's root on the path first, for a fresh clone)

TINY = torch.finfo(torch.float32).tiny


def optimizer_with_subnormal_rows(rows: int, cols: int, share: float) -> torch.optim.AdamW:
    """A fused AdamW over one (rows, cols) weight after one step, the running means of its last `share` of rows
    subnormal and their gradients zero (words not seen lately), as kjv-tuned's embedding has them."""
    weight = torch.nn.Parameter(torch.randn(rows, cols) * 0.05)
    optimizer = torch.optim.AdamW([weight], lr=0.004, weight_decay=0.15, fused=True)
    weight.grad = torch.randn_like(weight) * 1e-3
    optimizer.step()
    unseen = int(rows * share)
    optimizer.state[weight]["exp_avg"][rows - unseen :] = torch.rand(unseen, cols) * 1e-38 + TINY / 100
    weight.grad[rows - unseen :] = 0
    return optimizer


def step_ms(optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step's time in milliseconds."""
    started = time.perf_counter()
    optimizer.step()
    return (time.perf_counter() - started) * 1e3


def count_subnormal(checkpoint: Path) -> None:
    """Print each optimizer-state tensor of a checkpoint with subnormal values: how many, and the share."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer"]["state"]
    for index, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() > 1:
                magnitude = value.abs()
                subnormal = int(((magnitude > 0) & (magnitude < TINY)).sum())
                if subnormal:
                    print(f"parameter {index} {key} {tuple(value.shape)}: {subnormal:,} subnormal "
                          f"({subnormal / value.numel():.1%})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.18, help="Share of the rows with subnormal running means.")
    parser.add_argument("--rounds", type=int, default=15, help="Timed steps of each side, alternating.")
    parser.add_argument("--checkpoint", type=Path, help="Also count the subnormal state of this run checkpoint.")
    args = parser.parse_args()
    if args.checkpoint:
        count_subnormal(args.checkpoint)
    kept = optimizer_with_subnormal_rows(12_770, 400, args.share)
    zeroed = optimizer_with_subnormal_rows(12_770, 400, args.share)
    times: dict[str, list[float]] = {"subnormal kept": [], "zero_tiny_state": [], "(zero_tiny_state itself)": []}
    for _ in range(args.rounds):
        times["subnormal kept"].append(step_ms(kept))
        for values in kept.state.values():  # back to subnormal: the decay flushes them to zero within ~150 steps
            values["exp_avg"][values["exp_avg"] == 0] = TINY / 2
        started = time.perf_counter()
        zero_tiny_state(zeroed)  # the trainer runs it every TINY_EVERY steps
        times["(zero_tiny_state itself)"].append((time.perf_counter() - started) * 1e3)
        times["zero_tiny_state"].append(step_ms(zeroed))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fused AdamW step, 12,770 x 400, "
          f"{args.share:.0%} of the rows' running means subnormal:")  # fmt: skip
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"  {name:16s} {median:7.2f} ms (median of {args.rounds})")
    every = medians["zero_tiny_state"] + medians["(zero_tiny_state itself)"] / TINY_EVERY
    print(f"  ratio {medians['subnormal kept'] / every:.2f}x (zero_tiny_state's own time shared by {TINY_EVERY} steps)")


if __name__ == "__main__":
    main()
