"""Generation speed: latency of 100 characters for one prompt, and throughput for 64 prompts at once.

Compared with the book's `predict_ch8` (one prompt at a time, one model call per prompt character and per generated
character, the argmax read back to Python every step). Weights are random: speed does not depend on them.

    .venv/bin/python bench/generate_speed.py
    .venv/bin/python bench/generate_speed.py --rnn lstm --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnnlm.cpu.threads import torch_threads
from rnnlm.generate import generate
from rnnlm.model import RNNLM
from rnnlm.tokens import Vocab

VOCAB = Vocab(["<unk>", " ", *"etaoinsrhldmucfwgypbvkxjqz"])  # the book's 28 tokens
PROMPTS = ["time traveller", "the machine", "a", "it was", "the time traveller said", "we"]


@torch.no_grad()
def book_predict_ch8(prefix: str, num_preds: int, net: RNNLM, vocab: Vocab, device) -> str:
    """D2L `predict_ch8`, verbatim in spirit: Python list of outputs, a model call and a host read per character."""
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab.index[prefix[0]]]

    def get_input():
        return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

    for y in prefix[1:]:  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(vocab.index[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join(vocab.tokens[i] for i in outputs)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rnn", default="rnn", choices=["rnn", "gru", "lstm"])
    parser.add_argument("--num_hiddens", type=int, default=256)
    parser.add_argument("--num_preds", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="prompts at once for the throughput figure")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), args.num_hiddens, args.rnn).to(device).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    n = args.num_preds
    with torch_threads(args.threads if device.type == "cpu" else 0):
        same = generate(model, VOCAB, ["time traveller"], n)[0] == book_predict_ch8(
            "time traveller", n, model, VOCAB, device
        )
        assert same, "greedy generation must equal the book's predict_ch8"
        one = timed(lambda: generate(model, VOCAB, ["time traveller"], n), args.repeats)
        one_book = timed(lambda: book_predict_ch8("time traveller", n, model, VOCAB, device), args.repeats)
        many = timed(lambda: generate(model, VOCAB, prompts, n, temperature=0.8, top_k=5, seed=0), args.repeats)
        many_book = timed(lambda: [book_predict_ch8(p, n, model, VOCAB, device) for p in prompts], args.repeats)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {device}, {threads} threads; {args.rnn} {args.num_hiddens}, greedy and top-5")
    print(f"{'':34} {'project':>12} {'book predict_ch8':>17} {'ratio':>6}")
    print(
        f"{'1 prompt, ' + str(n) + ' chars: latency (ms)':34} {one * 1e3:12.1f} {one_book * 1e3:17.1f} "
        f"{one_book / one:5.1f}x"
    )
    rate, rate_book = args.batch * n / many, args.batch * n / many_book
    label = f"{args.batch} prompts: generated chars/s"
    print(f"{label:34} {rate:12,.0f} {rate_book:17,.0f} {rate / rate_book:5.1f}x")


if __name__ == "__main__":
    main()
