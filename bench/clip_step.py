"""What the clip costs a real-text step, and what taking it inside the fused AdamW (`rnnlm.train.clip_and_step`)
gives back.

Trains minibatches of a recipe's model (kjv-best.toml by default, over a 12,769-word vocabulary as kjv.txt gives it)
on random frequent-word tokens, alternating between torch's `clip_grad_norm_` then the AdamW step and
`clip_and_step`, and prints the median time of each and of the whole minibatch (forward, backward, clip, step).

    .venv/bin/python bench/clip_step.py
    .venv/bin/python bench/clip_step.py --recipe recipes/kjv-tuned.toml --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnnlm import cpu  # noqa: E402  (the project's root on the path first, for a fresh clone)
from rnnlm.config import TrainConfig  # noqa: E402
from rnnlm.model import build_model  # noqa: E402
from rnnlm.train import clip_and_step, make_optimizer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kjv-best.toml"


def torch_clip_then_step(model, optimizer, max_norm: float) -> None:
    """The reference: torch's clip_grad_norm_ (a pass that scales every gradient), then the step."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    optimizer.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe whose model and optimizer to time")
    parser.add_argument("--vocab", type=int, default=12_769, help="the vocabulary size (kjv.txt's by default)")
    parser.add_argument("--steps", type=int, default=300, help="timed minibatches, alternating the two ways")
    args = parser.parse_args(argv)
    config = TrainConfig.from_recipe(args.recipe)
    if config.optimizer != "adamw":
        parser.error(f"{args.recipe} trains with {config.optimizer}; clip_and_step changes only AdamW's step")
    torch.manual_seed(0)
    model = build_model(config, args.vocab)
    optimizer = make_optimizer(model, config.lr, config)
    ids = (torch.rand(config.batch_size, config.num_steps + 1) ** 3 * args.vocab).long()  # mostly frequent words
    ways = {"clip_grad_norm_ then step": torch_clip_then_step, "clip_and_step": clip_and_step}
    clip, whole = {name: [] for name in ways}, {name: [] for name in ways}
    window = (config.batch_size, config.num_steps)
    with cpu.settings(config.cpu_threads, model, window, False):
        for i in range(args.steps + 40):
            name = list(ways)[i % 2]
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model.loss(ids[:, :-1], ids[:, 1:], model.begin_state(config.batch_size))
            loss.backward()
            middle = time.perf_counter()
            ways[name](model, optimizer, config.grad_clip)
            if i >= 40:  # after the warm-up
                clip[name].append(time.perf_counter() - middle)
                whole[name].append(time.perf_counter() - started)
    weights = sum(p.numel() for p in model.parameters())
    print(f"{args.recipe.name}, {weights:,} weights, {torch.get_num_threads()} threads")
    print("| way | clip and step, median ms | whole minibatch, median ms |")
    print("|---|---:|---:|")
    for name in ways:
        print(f"| {name} | {1e3 * statistics.median(clip[name]):.2f} | {1e3 * statistics.median(whole[name]):.2f} |")


if __name__ == "__main__":
    main()
