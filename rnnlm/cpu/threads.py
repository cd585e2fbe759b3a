"""The engine's second core: one helper thread beside torch's own, and the ways a compiled window is shared with it.

torch computes on one thread (`cpu_threads` 1). The compiled windows release the GIL, so a helper thread runs a
share of each on the second core: half the batch rows (`by_rows`), or half the hidden units (`by_units`: the two
workers wait for each other after every step, in C), or rows and then units (`by_rows_then_units`). Worker 0 is the
calling thread, worker 1 the helper thread. Where torch computes on two threads or more (the adaptive softmax's
models), `by_units` runs its two workers on torch's own OpenMP threads instead (`team_free`).
"""

from __future__ import annotations

import atexit
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from rnnlm.cpu import native

Range = tuple[int, int]


class _Helper:
    """One background thread for the second core, started at first use (torch ops and ctypes calls release the
    GIL)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], object]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix="rnnlm-helper", initializer=torch.set_num_threads, initargs=(1,)
            )
            atexit.register(self._pool.shutdown)
        return self._pool.submit(fn)


helper = _Helper()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a cgroup's cpuset), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def team_free() -> bool:
    """Whether `by_units` runs its two workers on torch's own OpenMP threads: torch computes on two threads or more
    (a helper thread would contend with torch's second thread, which spins a while after each op waiting for the
    next), this process may run on two cores, and the kernels share torch's OpenMP runtime."""
    return torch.get_num_threads() >= 2 and usable_cores() > 1 and native.shares_torch_threads()


def second_core_free() -> bool:
    """Whether the helper thread takes a share of the work: torch computes on one thread and this process may run
    on another core (a process pinned to one core, e.g. `taskset -c 0`, keeps the whole work on its thread)."""
    return torch.get_num_threads() == 1 and usable_cores() > 1


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `num_threads` torch threads (0: keep torch's setting), then restore the previous count.

    The book's model does many small matmuls ((32, 256) x (256, 256) per time step): a second OpenMP thread gains
    little on them, and OpenMP threads that spin-wait collapse (10-50x slower) when other processes share the cores.
    """
    previous = torch.get_num_threads()
    if num_threads <= 0 or num_threads == previous:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def halves(n: int, workers: int) -> list[Range]:
    """[0, n) as one range, or as two halves for two workers."""
    return [(0, n)] if workers == 1 else [(0, n // 2), (n // 2, n)]


def by_rows(batch: int, share: bool, run: Callable[[Range], None]) -> None:
    """run(rows) over the batch rows: in two halves at once, one on the helper thread, when `share`."""
    rows = halves(batch, 2 if share and batch >= 2 else 1)
    if len(rows) == 1:
        run(rows[0])
        return
    other = helper.submit(lambda: run(rows[0]))
    run(rows[1])
    other.result()


def by_units(hidden: int, share: bool, prepare: Callable[..., native.Window]) -> None:
    """Run a compiled GRU/LSTM window: prepare(units, worker, workers, flags) returns one worker's window. The
    hidden units are halved between two workers, which wait for each other after every step: this thread and the
    helper thread when `share`, else torch's two OpenMP threads where `team_free`."""
    units = halves(hidden, 2 if hidden >= 2 and (share or team_free()) else 1)
    on_workers(len(units), lambda worker, workers, flags: prepare(units[worker], worker, workers, flags), not share)


Prepare = Callable[[int, int, torch.Tensor | None], Callable[[], None]]


def on_workers(workers: int, prepare: Prepare, team: bool = False) -> None:
    """Run prepare(worker, workers, flags)'s call for each worker (1 or 2): worker 0 here, worker 1 on the helper
    thread, sharing `flags` for their barriers (see kernels.c: barrier); with `team` (the calls are compiled
    windows), both on an OpenMP team of this thread where it has two threads. A worker that fails sets the abort
    flag, so that the other stops waiting for it."""
    if workers == 1:
        prepare(0, 1, None)()
        return
    flags = torch.zeros(24, dtype=torch.int64)  # each worker's finished steps, a cache line apart; then "abort"
    mine, theirs = prepare(0, 2, flags), prepare(1, 2, flags)
    if team and native.team([mine, theirs]):
        return

    def guarded(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException:
            flags[16] = 1  # the other worker stops waiting for this one
            raise

    other = helper.submit(lambda: guarded(theirs))
    try:
        guarded(mine)
    finally:
        other.result()


def by_rows_then_units(batch: int, hidden: int, share: bool, run: Callable[[Range, Range, Callable], None]) -> None:
    """run(rows, units, barrier) on each worker, one per core when `share`, so that a sequence of stages costs one
    hand-over to the helper thread: stages over batch rows `rows`, then, after `barrier()` (which returns once every
    worker has called it), stages over hidden units `units`."""
    workers = 2 if share and batch >= 2 and hidden >= 2 else 1
    rows, units = halves(batch, workers), halves(hidden, workers)

    def prepare(worker: int, workers: int, flags: torch.Tensor | None) -> Callable[[], None]:
        count = itertools.count(1)

        def barrier() -> None:
            if workers > 1 and native.barrier(flags, worker, workers, next(count)):
                raise RuntimeError("the other worker of a compiled window failed")

        return lambda: run(rows[worker], units[worker], barrier)

    on_workers(workers, prepare)
