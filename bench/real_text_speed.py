"""Training speed of the real-text models as a share of this machine's float32 matmul limit, and where the time goes.

Each model trains `--steps` minibatches of the corpus's training split with the project's trainer
(`rnnlm.train.train`: the CPU engine where it serves the model, AdamW as the recipe says), after a few untimed ones.
Printed per model: tokens/s, the matmul FLOP a training token costs (forward and backward, counted from the model's
matmuls and, for the adaptive softmax, how often the training text's targets fall in each cluster), the GFLOP/s
that makes, and its share of the float32 matmul limit measured in the same run (before and after the models). With
`--parts N`, the steps also run in N parts with the limit read between them, and each part's share of the higher
reading beside it is printed as a median and a range: on a machine whose speed wanders over a minute, the pairing
a before-and-after reading cannot give. With `--profile`, torch.profiler's operations that take the most time in a
few more steps.

    .venv/bin/python bench/real_text_speed.py                          # kjv.txt: the three models
    .venv/bin/python bench/real_text_speed.py --models adaptive --profile --steps 100
    .venv/bin/python bench/real_text_speed.py --models adaptive --steps 400 --parts 8

Models: `adaptive` is recipes/kjv-best.toml (2-layer LSTM 200, tied, adaptive softmax [2000, 6000]) or the
`--recipe` given (e.g. recipes/kjv-tuned.toml, 2x400); `full` the same
with the full softmax (pytorch/examples' word_language_model's model); `awd` the same with AWD-LSTM's regularisers
(locked dropout, weight drop 0.2, word dropout 0.05, AR/TAR); `char` a 2-layer character LSTM 512 on the same text
(raw characters, any script). `--torch_layers` also trains each model on torch's layers (the engine off), and `--amp`
with amp (bf16 matmuls where the CPU has AVX512-BF16), in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_speed import GATES, matmul_peak

from rnnlm import cpu
from rnnlm.config import TrainConfig
from rnnlm.data import fetch, prepare_data
from rnnlm.model import build_model, device_name, engine_name, matmul_precision
from rnnlm.train import make_optimizer, train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kjv-best.toml"
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kjv.txt"
MODELS = {
    "adaptive": {},
    "full": {"adaptive_cutoffs": []},
    "awd": {"locked_dropout": True, "weight_drop": 0.2, "embed_dropout": 0.05, "ar_alpha": 1.0, "tar_beta": 1.0},
    "char": {"preprocess": "raw", "tokenization": "char", "num_hiddens": 512, "embedding_dim": 512,
             "adaptive_cutoffs": [], "held_out": "bytes", "val_tokens": 100_000, "test_tokens": 100_000},
}  # fmt: skip


def flops_per_token(config: TrainConfig, model, vocab_size: int, train_ids: np.ndarray) -> float:
    """Matmul FLOP of one training token, forward and backward (3x the forward's 2 per multiply-add): each layer's
    gates on its input and hidden state, then the output layer (full, or the adaptive head plus each target's
    cluster, weighted by how often the training targets fall in it). The embedding is a lookup: none."""
    width = config.embedding_dim or vocab_size
    macs = 0
    for layer in range(config.num_layers):
        inputs = width if layer == 0 else config.num_hiddens
        macs += GATES[config.rnn] * config.num_hiddens * (inputs + config.num_hiddens)
    cutoffs = config.adaptive_cutoffs
    if not cutoffs:
        return 6.0 * (macs + vocab_size * config.num_hiddens)
    bounds = [*cutoffs, vocab_size]
    macs += (cutoffs[0] + len(cutoffs)) * config.num_hiddens  # the head
    for i, (low, high) in enumerate(zip(bounds, bounds[1:], strict=False)):
        share = float(np.mean((train_ids >= low) & (train_ids < high)))
        size = model.adaptive.tails[i][0].out_features  # the cluster's projection
        macs += share * size * (config.num_hiddens + high - low)
    return 6.0 * macs


def timed_training(
    config: TrainConfig, vocab_size: int, train_ids: np.ndarray, steps: int, warmup: int, parts: int = 0
) -> dict:
    """Tokens/s of `steps` minibatches after `warmup` untimed ones, from one model, with the trainer. With `parts`,
    the steps run in that many parts, the float32 matmul limit read before each and after the last: each part's
    tokens/s with the readings on either side of it (`beside`)."""
    torch.manual_seed(0)
    model, window = build_model(config, vocab_size), (config.batch_size, config.num_steps)
    optimizer, generator = make_optimizer(model, config.lr, config), torch.Generator().manual_seed(0)
    per_step = config.batch_size * config.num_steps
    part = train_ids[: warmup * per_step + 1]
    train(model, part, part[:0], config, optimizer, generator)
    counts = [steps] if parts < 1 else [steps * (i + 1) // parts - steps * i // parts for i in range(parts)]
    speeds, limits = [], []
    for count in counts:
        if parts:
            limits.append(best_limit())
        part = train_ids[: count * per_step + 1]
        speeds.append(train(model, part, part[:0], config, optimizer, generator).history[-1].tokens_per_sec)
    if parts:
        limits.append(best_limit())
    amp = config.amp
    where = {"device": device_name(model, config.cpu_threads, window, amp), "engine": engine_name(model, window, amp),
             "matmuls": matmul_precision(model, amp, window)}  # fmt: skip
    tokens_per_sec = sum(counts) / sum(count / speed for count, speed in zip(counts, speeds, strict=True))
    beside = [(speed, max(limits[i], limits[i + 1])) for i, speed in enumerate(speeds)] if parts else []
    return {"tokens_per_sec": tokens_per_sec, "beside": beside, "model": model, "optimizer": optimizer} | where


def best_limit() -> float:
    """The float32 matmul limit now: the quicker of torch's matmul and oneDNN's, best of 5 runs each (about 1 s)."""
    return max(matmul_peak(torch.device("cpu"), repeats=5).values())


def profile(config: TrainConfig, model, optimizer, train_ids: np.ndarray, steps: int) -> str:
    """torch.profiler's table of the operations with the most time of their own over `steps` minibatches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    part = train_ids[: steps * config.batch_size * config.num_steps + 1]
    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, part, part[:0], config, optimizer, torch.Generator().manual_seed(1))
    wall = time.perf_counter() - started
    events = prof.key_averages()
    recorded = sum(e.self_cpu_time_total for e in events) / 1e6
    table = events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
    note = f"wall {wall:.2f} s; torch ops' own time {recorded:.2f} s (the rest: the engine's C calls, Python)"
    return f"{table}\n{note}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the text to train on (kjv.txt)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which models")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe the models start from (kjv-best.toml)")
    parser.add_argument("--steps", type=int, default=300, help="timed minibatches per model")
    parser.add_argument("--warmup", type=int, default=20, help="untimed minibatches first")
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (torch.profiler)")
    parser.add_argument(
        "--parts", type=int, default=0,
        help="also time the steps in this many parts, each beside a reading of the limit on either side of it, and "
        "print the median part's share of the limit (for a machine whose speed wanders; 0: off)",
    )  # fmt: skip
    parser.add_argument("--torch_layers", action="store_true", help="also train each model on torch's layers")
    parser.add_argument("--amp", action="store_true", help="also train each model with amp (bf16 where it is quick)")
    parser.add_argument(
        "--cpu_threads", type=int, nargs="+", default=[0], help="torch threads to train with, each in turn (0: auto)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    before = matmul_peak(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            settings = {"corpus": str(args.corpus), "cache_dir": cache, "num_epochs": 1} | MODELS[name]
            config = TrainConfig.from_recipe(args.recipe, **settings)  # one pass over the part given to the trainer
            data = prepare_data(fetch(config), config)
            vocab, train_ids, _ = data.load()
            engines = (True, False) if args.torch_layers else (True,)
            amps = (False, True) if args.amp else (False,)
            runs = [(e, t, a) for e in engines for t in args.cpu_threads for a in amps]
            for engine, threads, amp in runs:
                cpu.ENABLED = engine
                run = config.model_copy(update={"cpu_threads": threads, "amp": amp})
                result = timed_training(run, len(vocab), train_ids, args.steps, args.warmup, args.parts)
                flops = flops_per_token(config, result["model"], len(vocab), np.asarray(train_ids))
                label = (name if engine else f"{name}, torch's layers") + (f", {threads} threads" if threads else "")
                label += f", amp ({result['matmuls']})" if amp else ""
                rows.append((label, len(vocab), result, flops))
                print(f"{label}: {len(vocab):,} tokens in the vocabulary; {result['device']}; {result['engine']}")
                if args.profile:
                    print(profile(run, result["model"], result["optimizer"], train_ids, max(args.steps // 3, 10)))
            cpu.ENABLED = True
    after = matmul_peak(torch.device("cpu"))
    peak = max(max(before.values()), max(after.values()))
    print(f"\nfloat32 matmul limit: {peak:.0f} GFLOP/s (before {before}, after {after})")
    paired = f" | share beside each part's limit: median (range) of {args.parts}" if args.parts else ""
    print(f"| model | vocabulary | tokens/s | MFLOP a token | GFLOP/s | share of the limit{paired} |")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.parts else ""))
    for name, vocab_size, result, flops in rows:
        speed = result["tokens_per_sec"]
        shares = sorted(part * flops / 1e9 / limit for part, limit in result["beside"])
        beside = f" {statistics.median(shares):.0%} ({shares[0]:.0%}-{shares[-1]:.0%}) |" if shares else ""
        print(f"| {name} | {vocab_size:,} | {speed:,.0f} | {flops / 1e6:.2f} | {speed * flops / 1e9:.1f} | "
              f"{speed * flops / 1e9 / peak:.0%} |{beside}")  # fmt: skip


if __name__ == "__main__":
    main()
