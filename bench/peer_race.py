"""A race on real text against pytorch/examples' word_language_model (the peer), run unmodified as a subprocess.

The corpus (default ../shared/data/kjv.txt, or --corpus FILE) is tokenized once, the same for both sides: each
non-empty line lowercased with punctuation split off (`rnnlm.corpus.split_words`), then split at line boundaries
into train / validation / test, test at the very end. The peer reads train.txt, valid.txt and test.txt and adds
`<eos>` at each line's end; this project trains on the same lines with the same `<eos>` written out
(`--preprocess raw --tokenization word`), its held-out tokens counted to the same lines. Both see the same token
streams and the same vocabulary. With `--tokenization char` or `bpe` our side trains instead on the same lines as
plain text (the peer's three files one after the other; `--held_out lines`, the peer's validation and test lines),
characters or byte-level BPE subwords (`--bpe_vocab_size`). Both sides are also scored in bits per byte of the same
held-out text, the peer's valid.txt and test.txt (a line break where the peer predicts `<eos>`): a side's summed
negative log-likelihood in bits over that text's UTF-8 bytes, so char, word and BPE models compare. Two races, each
printed as a table (validation and test bits per byte and perplexity, tokens/s of training, wall time):

  same-epochs  the peer's defaults on both sides (2-layer LSTM, 200 embedding, 200 hidden, dropout 0.2, SGD lr 20
               divided by 4 when validation does not improve, clip 0.25, 35 steps, batch 20): recipes/word-lstm.toml
               against `main.py` with no options, `--epochs` epochs each;
  budget       the same training time (`--minutes`) each: the peer's defaults (Ctrl-C at the end of the budget,
               after which it tests its best epoch, as its README says) against recipes/kjv-best.toml (`--recipe`).

    .venv/bin/python bench/peer_race.py                        # both races: 2 epochs, then 10 minutes (about 40 min)
    .venv/bin/python bench/peer_race.py --race same-epochs --epochs 1
    .venv/bin/python bench/peer_race.py --race budget --minutes 10 --recipe recipes/kjv-best.toml
    .venv/bin/python bench/peer_race.py --race budget --minutes 10 --tokenization bpe --bpe_vocab_size 8192
    .venv/bin/python bench/peer_race.py --race budget --tokenization char word bpe   # one peer run, three of ours
    .venv/bin/python bench/peer_race.py --race budget --minutes 60 --at_once   # one core each, at the same time

Our side runs `python flows/train_flow.py` for real (the temporary Prefect server, a private MLflow store in the
work folder); its numbers are read back from that store. Each side gets all the machine's cores (with
`--at_once`, one core each, both at once).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from rnnlm.config import read_recipe  # noqa: E402  (the project's root on the path first, for a fresh clone)
from rnnlm.corpus import split_words  # noqa: E402
from rnnlm.evaluate import bits_per_byte  # noqa: E402

EPOCH_LINE = re.compile(r"\| end of epoch\s+(\d+) \| time:\s*([\d.]+)s \| valid loss\s+[\d.]+ \| valid ppl\s+([\d.]+)")
BATCH_LINE = re.compile(r"\| epoch\s+\d+ \|\s+\d+/\s*\d+ batches \| lr [\d.]+ \| ms/batch\s+([\d.]+)")
TEST_LINE = re.compile(r"\| End of training \| test loss\s+[\d.]+ \| test ppl\s+([\d.]+)")
PEER_BATCH, PEER_BPTT = 20, 35  # the peer's defaults


@dataclass
class Side:
    """One side's outcome."""

    name: str
    val_perplexity: float  # of the weights it keeps (its best epoch)
    test_perplexity: float
    tokens_per_sec: float  # training only
    wall_seconds: float
    epochs: int
    note: str = ""
    val_bits_per_byte: float = math.nan  # of the same held-out text for both sides
    test_bits_per_byte: float = math.nan


def bits_of(perplexity: float, tokens: int, num_bytes: int) -> float:
    """Bits per byte of a text from a model's perplexity over its `tokens` word tokens (`rnnlm.evaluate.bits_per_byte`
    of the mean loss, the log of the perplexity)."""
    return bits_per_byte(math.log(perplexity), tokens, num_bytes)


def tokenized_lines(corpus: Path) -> list[list[str]]:
    """The corpus's non-empty lines as words and punctuation, lowercased."""
    with open(corpus, encoding="utf-8") as f:
        return [words for line in f if (words := split_words(line))]


def split_lines(lines: list[list[str]], val_tokens: int, test_tokens: int) -> tuple[list, list, list]:
    """Train, validation and test lines: test the last lines holding at least `test_tokens` tokens (each line's
    `<eos>` counted), validation the lines before them holding at least `val_tokens`, train the rest."""

    def take_from_end(end: int, tokens: int) -> int:
        start, count = end, 0
        while start > 0 and count < tokens:
            start -= 1
            count += len(lines[start]) + 1
        return start

    test_start = take_from_end(len(lines), test_tokens)
    val_start = take_from_end(test_start, val_tokens)
    return lines[:val_start], lines[val_start:test_start], lines[test_start:]


def write_data(work: Path, corpus: Path, val_tokens: int, test_tokens: int) -> dict:
    """The peer's three files and our one corpus file (same lines, `<eos>` written out) in `work`."""
    train, val, test = split_lines(tokenized_lines(corpus), val_tokens, test_tokens)
    peer = work / "peer_data"
    peer.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("valid", val), ("test", test)):
        (peer / f"{name}.txt").write_text("".join(" ".join(words) + "\n" for words in lines), encoding="utf-8")
    ours = work / "corpus.txt"
    ours.write_text("".join(" ".join(words) + " <eos>\n" for words in train + val + test), encoding="utf-8")
    plain = work / "corpus-plain.txt"  # the peer's three files one after the other: for char and BPE models
    plain.write_text("".join((peer / f"{name}.txt").read_text(encoding="utf-8") for name in ("train", "valid", "test")))
    count = lambda part: sum(len(words) + 1 for words in part)  # noqa: E731
    vocab = len({w for words in train + val + test for w in words}) + 1  # + <eos>
    held_out = {"val_lines": len(val), "test_lines": len(test), "plain": plain}
    for split, name in (("val", "valid"), ("test", "test")):
        held_out[f"{split}_bytes"] = (peer / f"{name}.txt").stat().st_size
    sizes = {"train": count(train), "val": count(val), "test": count(test), "vocab": vocab}
    return {"peer": peer, "ours": ours, **sizes, **held_out}


def pinned(core: int | None) -> tuple[dict, Callable[[], None]]:
    """(the environment, the function to call in the child before it starts) for a side on one core: one torch thread,
    the process and its children pinned to `core`; with None, all the machine's cores as it is."""
    if core is None:
        return dict(os.environ), _sigint_default

    def start() -> None:
        _sigint_default()
        os.sched_setaffinity(0, {core})

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, start


def run_peer(work: Path, peer_dir: Path, epochs: int, minutes: float | None, data: dict, core: int | None = None):
    """The peer's main.py with its defaults; with `minutes`, Ctrl-C (SIGINT) once that much training time is spent
    (its corpus loading, timed beforehand, not counted); with `core`, on that core alone."""
    train_tokens, folder = data["train"], work / "peer_data"
    command = [sys.executable, "-u", str(peer_dir / "main.py"), "--data", str(folder), "--save", str(work / "peer.pt")]
    command += ["--epochs", str(epochs)]
    loading, (env, start) = 0.0, pinned(core)
    if minutes:
        started = time.perf_counter()
        load = f"import sys; sys.path.insert(0, {str(peer_dir)!r}); import data; data.Corpus({str(folder)!r})"
        subprocess.run([sys.executable, "-c", load], check=True, env=env, preexec_fn=start)
        loading = time.perf_counter() - started
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=start
    )  # fmt: skip
    deadline = started + loading + 60 * minutes if minutes else None
    lines: list[str] = []

    def read() -> None:  # the peer's output, echoing its epoch and test lines
        for line in process.stdout:
            lines.append(line)
            if EPOCH_LINE.search(line) or TEST_LINE.search(line):
                print(f"  peer: {line.strip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    interrupted = False
    while process.poll() is None:
        if deadline and not interrupted and time.perf_counter() >= deadline:
            process.send_signal(signal.SIGINT)  # the peer then tests its best saved epoch
            interrupted = True
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - started
    output = "".join(lines)
    epochs_done = [(int(e), float(t), float(p)) for e, t, p in EPOCH_LINE.findall(output)]
    test = TEST_LINE.findall(output)
    if not epochs_done or not test:
        raise RuntimeError(f"the peer ended without a finished epoch and a test perplexity:\n{output[-3000:]}")
    ms_per_batch = [float(ms) for ms in BATCH_LINE.findall(output)]
    if ms_per_batch:  # its progress lines' training speed
        speed = PEER_BATCH * PEER_BPTT * 1000 / (sum(ms_per_batch) / len(ms_per_batch))
    else:  # epochs shorter than its progress interval: their time, validation included
        speed = train_tokens * len(epochs_done) / sum(t for _, t, _ in epochs_done)
    best_val = min(p for _, _, p in epochs_done)
    note = "Ctrl-C at the budget's end" if interrupted else ""
    bits = bits_of(best_val, data["val"], data["val_bytes"]), bits_of(float(test[-1]), data["test"], data["test_bytes"])
    name = "pytorch/examples word_language_model"
    return Side(name, best_val, float(test[-1]), speed, wall, len(epochs_done), note, *bits)


def _sigint_default() -> None:
    """In the peer's process before it starts: SIGINT's default action back, so that Python turns it into
    KeyboardInterrupt (a benchmark started in the background by a shell inherits SIGINT ignored, and the peer would
    then train past the budget)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_ours(
    work: Path,
    data: dict,
    recipe: Path,
    epochs: int | None,
    minutes: float | None,
    tag: str,
    tokenization: str = "word",
    bpe_vocab_size: int = 8192,
    core: int | None = None,
) -> Side:
    """`python flows/train_flow.py --config_file RECIPE` on our corpus file, in a private MLflow store: words with
    `<eos>` (the peer's tokens), or characters or BPE subwords of the same lines as plain text; with `core`, on that
    core alone (the flow's Prefect server too)."""
    store = f"sqlite:///{work / f'mlflow-{tag}.db'}"
    env, start = pinned(core)
    env.update(MLFLOW_TRACKING_URI=store, PREFECT_HOME=str(work / f"prefect-{tag}"))
    env.pop("PREFECT_API_URL", None)
    options = ["--config_file", str(recipe), "--preprocess", "raw", "--min_freq", "0", "--max_tokens", "-1"]
    options += ["--tokenization", tokenization]
    if tokenization == "word":
        options += ["--corpus", str(data["ours"]), "--val_tokens", str(data["val"]), "--test_tokens", str(data["test"])]
    else:  # the same held-out lines, as text
        options += ["--corpus", str(data["plain"]), "--held_out", "lines"]
        options += ["--val_tokens", str(data["val_lines"]), "--test_tokens", str(data["test_lines"])]
        options += ["--bpe_vocab_size", str(bpe_vocab_size)] if tokenization == "bpe" else []
        cutoffs = read_recipe(recipe).get("adaptive_cutoffs") or []
        if cutoffs and (tokenization == "char" or cutoffs[-1] >= bpe_vocab_size):  # the word ranks do not fit
            options += ["--adaptive_cutoffs", "[]"]
    options += ["--cache_dir", str(work / "cache")]
    options += ["--experiment", f"race-{tag}", "--registered_model", f"race-{tag}", "--resume", "never"]
    if epochs:
        options += ["--num_epochs", str(epochs)]
    if minutes:
        options += ["--max_minutes", str(minutes)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "flows/train_flow.py", *options], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=start,
    )  # fmt: skip
    tail: list[str] = []
    for line in process.stdout:
        tail = (tail + [line])[-60:]
        if " - epoch " in line or "this run registers" in line or "stopped" in line:
            print(f"  ours: {line.split(' - ', 1)[-1].strip()}", flush=True)
    if process.wait() != 0:
        raise RuntimeError("our training failed:\n" + "".join(tail))
    wall = time.perf_counter() - started
    from mlflow import MlflowClient

    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name(f"race-{tag}").experiment_id], max_results=1)
    m = run.data.metrics
    note = run.data.tags.get("stopped", "")
    val, test = m["final_registered_val_perplexity"], m["final_registered_test_perplexity"]
    if tokenization == "word":  # the peer's tokens: bits over the same text's bytes, as for the peer
        bits = bits_of(val, data["val"], data["val_bytes"]), bits_of(test, data["test"], data["test_bytes"])
    else:  # the run measured them itself, over the same text
        bits = m["final_registered_val_bits_per_byte"], m["final_registered_test_bits_per_byte"]
    epochs_done = len(client.get_metric_history(run.info.run_id, "train_perplexity"))
    name = f"this project ({recipe.name}, {tokenization})"
    return Side(name, val, test, m["final_tokens_per_sec"], wall, epochs_done, note, *bits)


def race(peer, ours, kinds: list[str], cores: list[int] | None) -> tuple[Side, list[Side]]:
    """The peer (`peer(core)`) and then ours, a run for each tokenization (`ours(kind, core)`), one after the other on
    all the cores; with `cores`, the peer on the first at the same time as ours on the second."""
    if cores is None:
        return peer(None), [ours(kind, None) for kind in kinds]
    outcome: dict = {}

    def peer_side() -> None:
        try:
            outcome["peer"] = peer(cores[0])
        except Exception as error:  # noqa: BLE001  (reported once ours ends)
            outcome["error"] = error

    thread = threading.Thread(target=peer_side)
    thread.start()
    ours_sides = [ours(kinds[0], cores[1])]
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["peer"], ours_sides


def table(title: str, peer: Side, ours: list[Side]) -> str:
    """The peer and each of our sides as a markdown table, with our figures as ratios of the peer's."""
    rows = [
        "| | validation bits/byte | test bits/byte | validation ppl | test ppl | tokens/s (training) | wall | epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in (peer, *ours):
        note = f" ({side.note})" if side.note else ""
        rows.append(
            f"| {side.name}{note} | {side.val_bits_per_byte:.4f} | {side.test_bits_per_byte:.4f} | "
            f"{side.val_perplexity:.2f} | {side.test_perplexity:.2f} | "
            f"{side.tokens_per_sec:,.0f} | {side.wall_seconds:,.0f} s | {side.epochs} |"
        )
    ratios = [
        f"{side.name} / peer: validation bits per byte {side.val_bits_per_byte / peer.val_bits_per_byte:.3f}x, "
        f"test bits per byte {side.test_bits_per_byte / peer.test_bits_per_byte:.3f}x, "
        f"validation ppl {side.val_perplexity / peer.val_perplexity:.3f}x, "
        f"test ppl {side.test_perplexity / peer.test_perplexity:.3f}x, "
        f"tokens/s {side.tokens_per_sec / peer.tokens_per_sec:.2f}x"
        for side in ours
    ]
    return f"### {title}\n\n" + "\n".join(rows) + "\n\n" + "\n".join(ratios) + "\n"


def machine() -> str:
    """The CPU and cores, in words."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {isa}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=SHARED / "data" / "kjv.txt", help="Plain text to race on.")
    parser.add_argument("--peer", type=Path, default=SHARED / "peers" / "word_language_model",
                        help="The peer's folder (its main.py).")  # fmt: skip
    parser.add_argument("--race", choices=["same-epochs", "budget", "both"], default="both", help="Which race.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs of each side in the same-epochs race.")
    parser.add_argument("--minutes", type=float, default=10.0, help="Training minutes of each side in the budget race.")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "kjv-best.toml",
                        help="Our recipe in the budget race.")  # fmt: skip
    parser.add_argument("--tokenization", choices=["char", "word", "bpe"], nargs="+", default=["word"],
                        help="Our side's tokens (the peer's are words); several: one run of ours each against one "
                        "run of the peer.")  # fmt: skip
    parser.add_argument("--bpe_vocab_size", type=int, default=8192, help="With --tokenization bpe: subword tokens.")
    parser.add_argument("--val_tokens", type=int, default=80_000, help="Validation tokens (whole lines) held out.")
    parser.add_argument("--test_tokens", type=int, default=80_000, help="Test tokens (whole lines) at the end.")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a new temporary one).")
    parser.add_argument("--at_once", action="store_true",
                        help="Both sides at the same time, each on one core with one thread (the peer on the first "
                        "core, ours on the second): a race takes its time once instead of twice.")  # fmt: skip
    args = parser.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"error: no corpus at {args.corpus}; give one with --corpus FILE")
    if not (args.peer / "main.py").is_file():
        sys.exit(f"error: no peer at {args.peer} (its main.py); give its folder with --peer")
    cores = sorted(os.sched_getaffinity(0))
    if args.at_once and (len(cores) < 2 or len(args.tokenization) > 1):
        sys.exit("error: --at_once runs one side a core: it needs two usable cores and one --tokenization")
    work = args.work or Path(tempfile.mkdtemp(prefix="peer-race-"))
    data = write_data(work, args.corpus, args.val_tokens, args.test_tokens)
    print(f"{args.corpus.name}: {data['train']:,} training, {data['val']:,} validation, {data['test']:,} test tokens; "
          f"{data['vocab']:,} word types; work folder {work}")  # fmt: skip
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}\n", flush=True)
    results = []
    if args.race in ("same-epochs", "both"):
        print(f"same-epochs race: the peer's defaults, {args.epochs} epochs each", flush=True)
        recipe = ROOT / "recipes" / "word-lstm.toml"
        peer, ours = race(
            lambda core: run_peer(work, args.peer, args.epochs, None, data, core),
            lambda kind, core: run_ours(
                work, data, recipe, args.epochs, None, f"same-epochs-{kind}", kind, args.bpe_vocab_size, core
            ),
            args.tokenization, cores if args.at_once else None,
        )  # fmt: skip
        results.append(table(f"Same hyperparameters, {args.epochs} epochs", peer, ours))
        print(results[-1], flush=True)
    if args.race in ("budget", "both"):
        print(f"budget race: {args.minutes:g} minutes of training each", flush=True)
        peer, ours = race(
            lambda core: run_peer(work, args.peer, 40, args.minutes, data, core),
            lambda kind, core: run_ours(
                work, data, args.recipe, None, args.minutes, f"budget-{kind}", kind, args.bpe_vocab_size, core
            ),
            args.tokenization, cores if args.at_once else None,
        )  # fmt: skip
        results.append(table(f"{args.minutes:g} minutes of training each, our {args.recipe.name}", peer, ours))
        print(results[-1], flush=True)
    print("\n".join(results))


if __name__ == "__main__":
    main()
