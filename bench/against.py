"""A recipe's training speed here against another revision of the project, in turn, and as a share of the limit.

Issue 25 asks kjv-best's step at 1.5x the engine it started from (7401e87) on the same machine, and at 60% of the
float32 matmul limit measured in the same run. On a machine whose speed wanders by 10-30% within minutes, only rounds
in turn compare: each round trains `--steps` minibatches (after `--warmup` untimed ones) of the recipe with the
revision `--rev` (exported from git into a temporary folder) and with this tree, each in a fresh process, the one
that goes first taking turns, and reads the limit before and after. Printed: each round's tokens/s, their ratio
and this tree's share of the higher reading; then the means, the ratio of the means and the median round's.

    .venv/bin/python bench/against.py                                  # 7401e87, kjv-best.toml, six rounds
    .venv/bin/python bench/against.py --rev HEAD~3 --rounds 10 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from real_text_speed import DEFAULT_CORPUS, RECIPE, best_limit, flops_per_token

from rnnlm.config import TrainConfig
from rnnlm.data import fetch, prepare_data
from rnnlm.model import build_model

ROOT = Path(__file__).resolve().parents[1]
START = "7401e87"  # the engine as issue 25 found it

# One side's training, in a fresh process with that side's project first on the path: only the API both sides have.
CHILD = """
import json, sys, time
from pathlib import Path
root, recipe, corpus, cache, steps, warmup = sys.argv[1:7]
sys.path.insert(0, root)
import torch
import rnnlm
from rnnlm.config import TrainConfig
from rnnlm.data import fetch, prepare_data
from rnnlm.model import build_model
from rnnlm.train import make_optimizer, train
config = TrainConfig.from_recipe(Path(recipe), corpus=corpus, cache_dir=cache, num_epochs=1)
vocab, ids, _ = prepare_data(fetch(config), config).load()
torch.manual_seed(0)
model = build_model(config, len(vocab))
optimizer, generator = make_optimizer(model, config.lr, config), torch.Generator().manual_seed(0)
per = config.batch_size * config.num_steps
part = ids[: int(warmup) * per + 1]
train(model, part, part[:0], config, optimizer, generator)
part = ids[: int(steps) * per + 1]
started = time.perf_counter()
train(model, part, part[:0], config, optimizer, generator)
speed = int(steps) * per / (time.perf_counter() - started)
print(json.dumps({"tokens_per_sec": speed, "library": str(Path(rnnlm.__file__).resolve().parent)}))
"""


def export(rev: str, folder: Path) -> Path:
    """The project at git revision `rev`, written into `folder` (git archive): its root. SystemExit with git's
    message when the revision is unknown."""
    archive = folder / "rev.tar"
    made = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode:
        raise SystemExit(f"error: cannot export revision {rev!r}: {made.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def side(root: Path, args: argparse.Namespace, cache: Path) -> float:
    """Tokens/s of one side's training (`CHILD`) with the project at `root`."""
    command = [sys.executable, "-c", CHILD, str(root), str(args.recipe), str(args.corpus), str(cache),
               str(args.steps), str(args.warmup)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    if done.returncode:
        raise SystemExit(f"error: training at {root} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["library"]) != (root / "rnnlm").resolve():  # an installed copy took the other side's place
        raise SystemExit(f"error: the side at {root} imported rnnlm from {result['library']}")
    return result["tokens_per_sec"]


def flops_of(args: argparse.Namespace, cache: Path) -> float:
    """The recipe's matmul FLOP a training token on the corpus (`real_text_speed.flops_per_token`)."""
    config = TrainConfig.from_recipe(args.recipe, corpus=str(args.corpus), cache_dir=str(cache), num_epochs=1)
    vocab, ids, _ = prepare_data(fetch(config), config).load()
    torch.manual_seed(0)
    return flops_per_token(config, build_model(config, len(vocab)), len(vocab), np.asarray(ids))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=START, help=f"the git revision to race ({START}: where issue 25 started)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the text to train on (kjv.txt)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe both sides train (kjv-best.toml)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each side once a round, first in turn")
    parser.add_argument("--steps", type=int, default=300, help="timed minibatches a side a round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed minibatches first")
    args = parser.parse_args(argv)
    if not args.corpus.is_file() or not args.recipe.is_file():
        parser.error(f"no such file: {args.corpus if not args.corpus.is_file() else args.recipe}")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps take 1 or more, --warmup 0 or more")
    args.corpus, args.recipe = args.corpus.resolve(), args.recipe.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        theirs = export(args.rev, folder)
        flops = flops_of(args, folder / "cache-here")
        print(
            f"{args.recipe.name} on {args.corpus.name}: {flops / 1e6:.2f} MFLOP a token; {args.rev} against this tree"
        )
        print(f"| round | {args.rev} tokens/s | this tree | ratio | limit GFLOP/s | this tree's share |")
        print("|---:|---:|---:|---:|---:|---:|")
        rows = []
        for round_ in range(1, args.rounds + 1):
            before = best_limit()
            if round_ % 2:  # the revision first in odd rounds, this tree first in even ones: neither gains by its place
                old, new = side(theirs, args, folder / "cache-rev"), side(ROOT, args, folder / "cache-here")
            else:
                new, old = side(ROOT, args, folder / "cache-here"), side(theirs, args, folder / "cache-rev")
            limit = max(before, best_limit())
            rows.append((old, new, limit))
            share = new * flops / 1e9 / limit
            print(f"| {round_} | {old:,.0f} | {new:,.0f} | {new / old:.2f}x | {limit:.0f} | {share:.0%} |", flush=True)
    old, new = statistics.mean(r[0] for r in rows), statistics.mean(r[1] for r in rows)
    ratios = sorted(r[1] / r[0] for r in rows)
    shares = sorted(r[1] * flops / 1e9 / r[2] for r in rows)
    print(f"| mean | {old:,.0f} | {new:,.0f} | **{new / old:.2f}x** (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x, median "
          f"{statistics.median(ratios):.2f}x) | | {statistics.median(shares):.0%} median ({shares[0]:.0%}-"
          f"{shares[-1]:.0%}) |")  # fmt: skip


if __name__ == "__main__":
    main()
