"""Side-by-side training speed: the book's `train_ch8` loop against the project's trainer, in one process.

Both train on the same tokens (the first 10,000 characters of The Time Machine), from the same initial weights, with
the same hyperparameters and the same random offset each epoch. They alternate in short timed segments (`--segment`
epochs each) after a warm-up, so that noise from other processes on the machine hits both alike. Printed: tokens/s
of each, the ratio, and the last-epoch training perplexity of each after the full schedule.

    .venv/bin/python bench/train_speed.py                 # RNN, GRU, LSTM at 500 epochs (about 10 minutes on 2 cores)
    .venv/bin/python bench/train_speed.py --quick         # 60 epochs each, a smoke run
    .venv/bin/python bench/train_speed.py --rnn gru --epochs 100 --device cuda
    .venv/bin/python bench/train_speed.py --rnn rnn --seeds 0 1 2 3 4   # the final perplexities' spread over seeds
    .venv/bin/python bench/train_speed.py --rnn lstm --amp             # the LSTM's bf16 matmuls (AVX512-BF16 CPUs)
    .venv/bin/python bench/train_speed.py --rnn lstm --amp --book_amp  # against the book's loop under bf16 autocast
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnlm.config import TrainConfig
from rnnlm.corpus import read_text
from rnnlm.cpu.recurrence import ONEDNN
from rnnlm.cpu.threads import torch_threads
from rnnlm.model import RNNLM, device_name, engine_name
from rnnlm.tokens import build_vocab, encode, prepare_text
from rnnlm.train import autocast, make_optimizer, train

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "timemachine.txt"


# --- the book's loop (D2L 8.5/8.6, PyTorch), kept faithful on purpose -------------------------------------------
class BookRNNModel(nn.Module):
    """D2L's `RNNModel`: one-hot float inputs built every batch, a torch RNN layer, a linear output layer."""

    def __init__(self, rnn_layer: nn.Module, vocab_size: int):
        super().__init__()
        self.rnn, self.vocab_size = rnn_layer, vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.linear = nn.Linear(self.num_hiddens, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size)
        X = X.to(torch.float32)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, device, batch_size=1):
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


def book_seq_data_iter_sequential(corpus: list[int], batch_size: int, num_steps: int, offsets: torch.Generator):
    """D2L `seq_data_iter_sequential`: the minibatches rebuilt from a Python list every epoch. The book draws the
    offset with `random.randint(0, num_steps)`; here the same range comes from a torch generator seeded as the
    project's, so that both loops see the same offsets and their perplexities compare pair by pair (with different
    offsets, the last epochs' spikes differ by chance: docs/benchmarks.md)."""
    offset = int(torch.randint(0, num_steps + 1, (1,), generator=offsets))
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset : offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1 : offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i : i + num_steps], Ys[:, i : i + num_steps]


def book_grad_clipping(net: nn.Module, theta: float) -> None:
    """D2L `grad_clipping`: the norm computed in Python, and a host sync for the `if`."""
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def book_train_epoch(
    net, corpus, batch_size, num_steps, loss, updater, device, offsets, amp: bool = False
) -> tuple[float, int]:
    """D2L `train_epoch_ch8` (sequential partitioning); returns (perplexity, tokens). `amp`, not the book's: the
    forward pass and loss under bf16 autocast (`--book_amp`)."""
    state = None
    metric = [0.0, 0.0]
    for X, Y in book_seq_data_iter_sequential(corpus, batch_size, num_steps, offsets):
        if state is None:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        elif not isinstance(state, tuple):
            state.detach_()
        else:
            for s in state:
                s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(device), y.to(device)
        with autocast(device, amp):
            y_hat, state = net(X, state)
            l = loss(y_hat, y.long()).mean()  # noqa: E741 (the book's name)
        updater.zero_grad()
        l.backward()
        book_grad_clipping(net, 1)
        updater.step()
        metric[0] += float(l.detach() * y.numel())  # d2l.Accumulator.add: a host read every batch
        metric[1] += y.numel()
    return math.exp(metric[0] / metric[1]), int(metric[1])


# --- the harness -------------------------------------------------------------------------------------------------
def book_corpus(path: Path, max_tokens: int) -> tuple[int, list[int]]:
    """The book's `load_corpus_time_machine(max_tokens)`: vocab size and the first tokens as indices."""
    text = prepare_text(read_text(path), "book", "char")
    vocab = build_vocab(text, "char")
    return len(vocab), encode(text, vocab, "char")[:max_tokens].tolist()


def make_pair(rnn: str, vocab_size: int, num_hiddens: int, seed: int, device: torch.device):
    """The book's model and the project's, with the same initial weights."""
    torch.manual_seed(seed)
    layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[rnn](vocab_size, num_hiddens)
    book = BookRNNModel(layer, vocab_size).to(device)
    project = RNNLM(vocab_size, num_hiddens, rnn).to(device)
    project.load_state_dict(book.state_dict())
    return book, project


class Runner:
    """One side of the race: trains `n` epochs at a time and keeps the time and tokens it spent."""

    def __init__(self, name: str, step):
        self.name, self.step = name, step
        self.seconds, self.tokens, self.epochs, self.perplexity = 0.0, 0, 0, float("nan")

    def run(self, epochs: int, timed: bool = True) -> None:
        sync()
        start = time.perf_counter()
        tokens = 0
        for _ in range(epochs):
            self.perplexity, n = self.step()
            tokens += n
        sync()
        if timed:
            self.seconds += time.perf_counter() - start
            self.tokens += tokens
        self.epochs += epochs

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def flops_per_token(rnn: str, vocab_size: int, num_hiddens: int) -> float:
    """Matmul FLOPs of one training token, counted as the book's model computes them (the one-hot input as a dense
    product): forward G*H*(H+V) + V*H multiply-adds for a layer with G gate blocks; backward twice that."""
    macs = GATES[rnn] * num_hiddens * (num_hiddens + vocab_size) + vocab_size * num_hiddens
    return 2 * 3 * macs


def matmul_peak(device: torch.device, threads: int = 0, size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """This machine's float32 matmul limit in GFLOP/s: a large square matmul, best of `repeats`, through torch's
    matmul (MKL on x86 CPUs) and, on the CPU, through oneDNN's linear (which the LSTM layer and the project's RNN
    kernel use; on AMD CPUs MKL runs at less than half of it). 0 threads: torch's default."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    kernels = {"torch.matmul": lambda: a @ b}
    if device.type == "cpu" and ONEDNN:
        packed = torch.ops.mkldnn._reorder_linear_weight(b, size)  # a @ b.T through oneDNN, b packed once
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    with torch_threads(threads if device.type == "cpu" else 0):
        return {name: best_gflops(kernel, 2 * size**3, repeats) for name, kernel in kernels.items()}


def best_gflops(kernel, flops: float, repeats: int) -> float:
    """`flops` over the quickest of `repeats` runs of `kernel`, in GFLOP/s."""
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        kernel()
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def race(args, rnn: str, seed: int, vocab_size: int, corpus: list[int], device: torch.device) -> dict:
    """Train both loops for the full schedule, alternating segments; return their speeds and perplexities."""
    book, project = make_pair(rnn, vocab_size, args.num_hiddens, seed, device)
    book_opt = torch.optim.SGD(book.parameters(), lr=args.lr)
    loss = nn.CrossEntropyLoss()
    settings = TrainConfig(
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        lr=args.lr,
        grad_clip=1.0,
        num_epochs=args.epochs,
        cpu_threads=args.threads,
        amp=args.amp,
    )
    project_opt = make_optimizer(project, args.lr)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.Generator().manual_seed(seed)  # the book loop's: the same stream of offsets as the project's
    tokens = np.asarray(corpus, dtype=np.uint8)  # the trainer puts them on the model's device
    one_epoch = settings.model_copy(update={"num_epochs": 1})

    def book_step():
        with torch_threads(args.book_threads if device.type == "cpu" else 0):  # 0: torch's default, as the book runs
            return book_train_epoch(
                book, corpus, args.batch_size, args.num_steps, loss, book_opt, device, offsets, args.book_amp
            )

    def project_step():
        ppl = train(project, tokens, tokens[:0], one_epoch, project_opt, generator).history[-1].train_perplexity
        n = ((len(corpus) - 1) // args.batch_size) // args.num_steps * args.batch_size * args.num_steps
        return ppl, n

    runners = [Runner("book", book_step), Runner("project", project_step)]
    for r in runners:  # warm-up epochs count towards the schedule but not the clock
        r.run(args.warmup, timed=False)
    remaining = args.epochs - args.warmup
    turn = 0
    while remaining > 0:
        n = min(args.segment, remaining)
        for r in runners if turn % 2 == 0 else runners[::-1]:  # alternate who goes first
            r.run(n)
        remaining -= n
        turn += 1
    b, p = runners
    return {
        "book_tps": b.tokens_per_sec,
        "project_tps": p.tokens_per_sec,
        "ratio": p.tokens_per_sec / b.tokens_per_sec,
        "book_ppl": b.perplexity,
        "project_ppl": p.perplexity,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rnn", nargs="+", default=["rnn", "gru", "lstm"], choices=["rnn", "gru", "lstm"])
    parser.add_argument("--epochs", type=int, default=500, help="full schedule, as the book (500)")
    parser.add_argument("--quick", action="store_true", help="60 epochs, for a smoke run")
    parser.add_argument("--segment", type=int, default=10, help="epochs per timed segment before switching loops")
    parser.add_argument("--warmup", type=int, default=5, help="untimed epochs of each loop first")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--max_tokens", type=int, default=10_000)
    parser.add_argument("--num_hiddens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_steps", type=int, default=35)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument(
        "--seeds",
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="seeds for weights and data offsets; several: one race per seed, then their means (the last epoch's "
        "perplexity wanders by a few hundredths from seed to seed)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="the project's bf16 matmuls: autocast on GPUs, the LSTM's recurrent matmuls on CPUs with AVX512-BF16",
    )
    parser.add_argument(
        "--book_amp",
        action="store_true",
        help="the book's loop with its forward pass and loss under bf16 autocast, for a reference at the precision "
        "of --amp (the book itself trains in float32)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="the project's cpu_threads setting (its default, 0: auto)"
    )
    parser.add_argument("--book_threads", type=int, default=0, help="torch threads for the book's loop; 0: default")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 60
    args.warmup = min(args.warmup, args.epochs - 1)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    vocab_size, corpus = book_corpus(args.corpus, args.max_tokens)
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; {len(corpus):,} tokens, "
        f"batch {args.batch_size}, {args.num_steps} steps, {args.num_hiddens} hiddens, {args.epochs} epochs"
    )
    print(
        f"book loop threads: {args.book_threads or torch.get_num_threads()}; project cpu_threads: {args.threads}, "
        f"amp: {args.amp}; book loop under bf16 autocast: {args.book_amp}; "
        f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    peaks = matmul_peak(device)
    peak = max(peaks.values())
    print(
        "float32 matmul limit (2048^3, default threads): "
        + ", ".join(f"{name} {gflops:,.0f} GFLOP/s" for name, gflops in peaks.items())
    )
    if (args.amp or args.book_amp) and device.type == "cpu":
        print(f"bf16 matmul limit (2048^3, default threads): {bf16_limit()}")
    for rnn in args.rnn:
        print(f"project's {rnn}: {project_path(rnn, vocab_size, args, device)}")
    print(
        f"{'model':6} {'seed':>4} {'book tok/s':>11} {'project tok/s':>14} {'ratio':>6} {'book ppl':>9} "
        f"{'project ppl':>12} {'kFLOP/tok':>10} {'book % limit':>13} {'project % limit':>16}"
    )
    for rnn in args.rnn:
        flops = flops_per_token(rnn, vocab_size, args.num_hiddens)
        results = []
        for seed in args.seeds:
            results.append(race(args, rnn, seed, vocab_size, corpus, device))
            print_row(rnn, str(seed), results[-1], flops, peak)
        if len(results) > 1:
            print_row(rnn, "mean", {k: statistics.fmean(r[k] for r in results) for k in results[0]}, flops, peak)
    print(
        "% limit: the book's model's matmul FLOPs per token times tokens/s, as a share of the best float32 matmul "
        "limit above; a loop at X% cannot run more than 100/X times faster on this machine in float32 (the project "
        "does about 10% fewer: its input products are row lookups)"
    )


def print_row(rnn: str, seed: str, r: dict, flops: float, peak: float) -> None:
    print(
        f"{rnn:6} {seed:>4} {r['book_tps']:11,.0f} {r['project_tps']:14,.0f} {r['ratio']:5.2f}x "
        f"{r['book_ppl']:9.3f} {r['project_ppl']:12.3f} {flops / 1e3:10,.0f} "
        f"{100 * r['book_tps'] * flops / 1e9 / peak:12.0f}% {100 * r['project_tps'] * flops / 1e9 / peak:15.0f}%",
        flush=True,
    )


def bf16_limit() -> str:
    """The CPU's bf16 matmul limit in words; not measured where oneDNN has no bf16 instructions (AVX512-BF16 or AMX):
    there torch emulates bf16 matmuls, minutes for the measurement's 2048^3 products, and amp stays float32 here."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "none (no AVX512-BF16 or AMX: bf16 matmuls are emulated, so amp trains in float32 here)"
    return f"{bf16_matmul_peak():,.0f} GFLOP/s"


def bf16_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """The CPU's bf16 matmul limit in GFLOP/s (torch's bf16 matmul is oneDNN's; float32 sums), best of `repeats`."""
    a, b = torch.randn(size, size).bfloat16(), torch.randn(size, size).bfloat16()
    return best_gflops(lambda: a @ b, 2 * size**3, repeats)


def project_path(rnn: str, vocab_size: int, args, device: torch.device) -> str:
    """Where and on which code the project's trainer runs this model here (as its MLflow tags say)."""
    model, window = RNNLM(vocab_size, args.num_hiddens, rnn).to(device), (args.batch_size, args.num_steps)
    return f"{engine_name(model, window, args.amp)} on {device_name(model, args.threads, window, args.amp)}"


if __name__ == "__main__":
    main()
