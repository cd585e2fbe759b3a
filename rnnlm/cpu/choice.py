"""Which of two ways to compute the same thing is quicker on this machine: measured once, then remembered.

A choice is keyed by what it is for (e.g. an LSTM step of a given size) and by the machine (CPU features, core
count, torch and kernel builds). It is measured at first use, keeping each candidate's best time, and kept in
`choices.json` beside the compiled kernels with the times measured, so that every later process on the machine takes
the same path (and so computes the same numbers) and can say why: a process that measured a choice another one
recorded first takes the recorded one.
`RNNLM_CPU_CHOICE=<name>=<candidate>,...` sets a choice by hand (e.g. `lstm-step=torch`); a name or candidate
not in KNOWN is refused (`checks.EngineSettingError`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable

import torch
from filelock import FileLock

from rnnlm.cpu import checks, native, threads

# Each candidate is timed in ROUNDS rounds at least, and in up to MAX_ROUNDS while the measurement has taken under
# SECONDS; its best time counts. On a 2-core Zen 3 whose speed swung between 37 and 56 ms for the same minibatch
# within seconds, five rounds chose torch's LSTM for recipes/kjv-best.toml in two measurements of four; twenty rounds
# chose the compiled one, 3% quicker in training, in three of three (docs/benchmarks.md).
ROUNDS, MAX_ROUNDS, SECONDS = 5, 20, 3.0
CALLS = 2 * MAX_ROUNDS  # each quick candidate's runs in a measurement: each timed one after an untimed one
_TIMES = "times"  # choices.json keeps each choice's measured times under its key and this word

# the choices the engine makes (a name's part before ':') and their candidates, as RNNLM_CPU_CHOICE may set them
KNOWN: dict[str, tuple[str, ...]] = {
    "lstm-step": ("compiled", "torch"),
    "matmul_tn": ("onednn", "torch"),
    "linear": ("onednn", "torch"),
    "linear-large": ("compiled", "torch"),
}

_known: dict[str, str] = {}
_unrecorded: set[str] = set()  # keys `made` found in no choices.json: not read again by this process
decisions: dict[str, str] = {}  # name -> "candidate (measured: 1.2 ms against 1.9 ms)", what this process chose


Candidates = dict[str, Callable[[], object]]


def fastest(
    name: str,
    candidates: Candidates | Callable[[], Candidates],
    per_threads: bool = True,
    handicap: dict[str, float] | None = None,
) -> str:
    """The name of the quickest candidate for `name` on this machine (a candidate is a call that does the work
    once; `candidates` may be a call that makes them, called only to measure); measured the first time any process
    asks, remembered after. With `per_threads`, the choice is made again for each number of torch threads (the
    candidates run at the caller's). `handicap` multiplies a candidate's measured time before the comparison (e.g.
    {"compiled": 1.1}: taken only where 10% quicker)."""
    if (chosen := _set_by_hand(name)) is not None:
        return chosen
    key = _key(name, per_threads)
    if key in _known:
        return _known[key]
    path = native.cache() / "choices.json"
    if key not in (known := _read(path)):
        # measured without the lock: a candidate may make choices of its own, on this thread or the helper thread
        chosen, times = _measure(candidates() if callable(candidates) else candidates, handicap or {})
        decisions[name] = f"{chosen} (measured: {times})"
        with FileLock(path.with_suffix(".lock")):
            known = _read(path)
            if key not in known:  # else another process measured it first: take its choice, as every process will
                known[key], known[f"{key} {_TIMES}"] = chosen, times
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
                os.replace(tmp, path)
    return _remember(name, key, known)


def made(name: str, per_threads: bool = True) -> str | None:
    """The choice `fastest` made or would take for `name` without measuring: set by hand, taken by this process, or
    recorded in choices.json by an earlier one; None when none was made (a dict lookup after the first call)."""
    if (chosen := _set_by_hand(name)) is not None:
        return chosen
    key = _key(name, per_threads)
    if key in _known or key in _unrecorded:
        return _known.get(key)
    known = _read(native.cache() / "choices.json")
    if key not in known:
        _unrecorded.add(key)
        return None
    return _remember(name, key, known)


def _set_by_hand(name: str) -> str | None:
    """The candidate RNNLM_CPU_CHOICE sets for `name`, if any, noted in `decisions`."""
    chosen = forced().get(name.split(":")[0])
    if chosen is not None:
        decisions[name] = f"{chosen} (set by RNNLM_CPU_CHOICE)"
    return chosen


def _remember(name: str, key: str, known: dict[str, str]) -> str:
    """Keep the recorded choice `known[key]` for this process, with how it was taken."""
    times = known.get(f"{key} {_TIMES}")
    decisions.setdefault(name, f"{known[key]} (measured before on this machine{f': {times}' if times else ''})")
    _known[key] = known[key]
    _unrecorded.discard(key)
    return known[key]


def _key(name: str, per_threads: bool) -> str:
    return f"{name}@{torch.get_num_threads() if per_threads else 'any'}@{_machine()}"


def quickest(name: str, **candidates: Callable[[], object]):
    """The result of the quickest of `candidates` (calls that compute the same result) for `name` here."""
    return candidates[fastest(name, candidates)]()


def _measure(candidates: dict[str, Callable[[], object]], handicap: dict[str, float]) -> tuple[str, str]:
    """The quickest candidate, and each one's time in words: its best timed run, the candidates taking turns
    (`_time_each`)."""
    best = dict.fromkeys(candidates, float("inf"))
    # as in training, whatever the caller's mode; the random numbers a candidate draws (dropout) are not the run's
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False), torch.enable_grad():
        _time_each(candidates, best)
    chosen = min(best, key=lambda name: best[name] * handicap.get(name, 1.0))
    times = " against ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in best.items())
    counted = "".join(f", {name}'s counted {factor:g}x" for name, factor in handicap.items())
    return chosen, times + counted


def _time_each(candidates: dict[str, Callable[[], object]], best: dict[str, float]) -> None:
    """Each candidate's best time into `best`: rounds in which the candidates take turns (a machine whose speed
    wanders over seconds slows them alike, not one of them), each timed right after an untimed run of its own
    (caches, allocations, lazy set-up, and the OpenMP threads the one before left spinning, about 8 ms on a 2-core
    Zen 3, which would share its cores); ROUNDS of them, then more up to MAX_ROUNDS within SECONDS."""
    began = time.perf_counter()
    for done in range(MAX_ROUNDS):
        if done >= ROUNDS and time.perf_counter() - began >= SECONDS:
            break
        for name, run in candidates.items():
            run()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)


def _read(path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def forced() -> dict[str, str]:
    return checks.forced_choices(KNOWN)


@functools.cache
def _machine() -> str:
    """What the speeds depend on: CPU features and cores, torch's build and threads, the kernels' source; and how
    they are measured (a choice measured in fewer rounds is measured again)."""
    rounds = f"{ROUNDS}-{MAX_ROUNDS}/{SECONDS}"
    parts = [native._cpu_features(), str(threads.usable_cores()), torch.__version__, native.SOURCE.read_text(), rounds]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:12]
