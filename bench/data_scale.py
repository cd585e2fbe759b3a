"""How data preparation scales: preprocessing + tokenization + vocab + corpus array for 1 MB, 10 MB and 100 MB texts
(1 GB with --big), made by repeating The Time Machine. Each size runs in a fresh process, so peak memory is its own.

Printed per size: seconds, MB/s and peak resident memory of the streaming path (`rnnlm.tokens.tokenize_file`, what
`prepare_data` uses), the same for the whole-text path (`read_text` + `prepare_text` + `build_vocab` + `encode`, the
whole file in memory at once, as `prepare_data` did before; up to 100 MB), and the anonymous memory of a process
that trains 20 minibatches on the memory-mapped ids.

    .venv/bin/python bench/data_scale.py            # 1, 10, 100 MB (about a minute)
    .venv/bin/python bench/data_scale.py --big      # and 1 GB (needs about 2 GB of free disk in --tmp)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"


def make_text(source: Path, size_mb: int, folder: Path) -> Path:
    """A text of about `size_mb` MB: the source repeated (whole copies, so every line stays a line)."""
    path = folder / f"corpus-{size_mb}mb.txt"
    data = source.read_bytes()
    copies = max(1, round(size_mb * 2**20 / len(data)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return path


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str, out: str) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import numpy as np  # noqa: F401  (imported before the baseline, like the code under test)
    import torch

    from rnnlm.corpus import read_text
    from rnnlm.tokens import build_vocab, encode, prepare_text, tokenize_file

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "stream":
        vocab, ids = tokenize_file(Path(path), Path(out))
    elif mode == "whole":
        text = prepare_text(read_text(Path(path)), "book", "char")
        vocab = build_vocab(text, "char")
        ids = encode(text, vocab, "char")
    else:  # train: 20 minibatches on the memory-mapped ids written by the stream run
        result = _train_some(Path(out), torch)
        print(json.dumps(result))
        return
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"seconds": seconds, "cpu": cpu, "peak_mb": peak, "base_mb": base, "tokens": len(ids), "vocab": len(vocab)}
        )
    )


def _train_some(ids_path: Path, torch) -> dict:
    import numpy as np

    from rnnlm.config import TrainConfig
    from rnnlm.model import RNNLM
    from rnnlm.train import make_optimizer, train

    ids = np.load(ids_path, mmap_mode="r")
    model = RNNLM(28, 256, "rnn")
    optimizer, settings = make_optimizer(model, 1.0), TrainConfig(batch_size=32, num_steps=35, num_epochs=1)
    window = ids[: 21 * 32 * 35 + 1]  # still memory-mapped: an epoch of 20 minibatches (the offset takes up to one)
    train(model, window, window[:0], settings, optimizer, torch.Generator().manual_seed(0))
    return {"rss_anon_mb": _rss_anon_mb(), "tokens": len(ids)}


def measure(mode: str, path: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(path), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="add a 1 GB text")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the generated texts (default: system tmp)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    sizes = [1, 10, 100] + ([1024] if args.big else [])
    header = (
        f"{'size':>7} {'stream s':>9} {'MB/s':>7} {'MB/cpu-s':>8} {'peak MB':>8} {'peak/file':>9}   "
        f"{'whole s':>8} {'MB/s':>6} {'peak MB':>8}   {'train anon MB':>13}"
    )
    print(header)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in sizes:
            path = make_text(args.corpus, size, Path(tmp))
            mb = path.stat().st_size / 2**20
            out = Path(tmp) / "ids.npy"
            s = measure("stream", path, out)
            w = measure("whole", path, out) if size <= 100 else None
            t = measure("train", path, out)
            whole = (
                f"{w['seconds']:8.2f} {mb / w['seconds']:6.1f} {w['peak_mb']:8.0f}"
                if w
                else f"{'-':>8} {'-':>6} {'-':>8}"
            )
            print(
                f"{mb:5.0f}MB {s['seconds']:9.2f} {mb / s['seconds']:7.1f} {mb / s['cpu']:8.1f} {s['peak_mb']:8.0f} "
                f"{(s['peak_mb'] - s['base_mb']) / mb:8.2f}x   {whole}   {t['rss_anon_mb']:13.0f}",
                flush=True,
            )
            path.unlink()
    print(
        "MB/cpu-s: MB per second of the process's CPU time (near what an idle core gives); peak MB: the process's peak "
        "resident memory (imports included); peak/file: (peak - memory after imports) / file size; "
        "train anon MB: anonymous memory after 20 training minibatches on the memory-mapped ids"
    )


if __name__ == "__main__":
    main()
