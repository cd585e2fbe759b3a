"""A run's lock (`try_lock` / `unlock`): one holder at a time between threads of one process as between processes,
released by its holder, and dropped by the operating system when the holding process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from helpers import PROJECT_ROOT

from tracking.runs import try_lock, unlock

HOLD = """
import sys
sys.path.insert(0, {root!r})
from tracking.runs import try_lock
print("held" if try_lock({path!r}) else "refused", flush=True)
sys.stdin.read()  # holds it until this process is told to end or is killed
"""


@contextmanager
def _other_process(path) -> Iterator[str]:
    """A real process that tries to take the lock; what it says ("held" or "refused"). It is killed after the block
    (if it holds the lock, the operating system drops it then)."""
    code = HOLD.format(root=str(PROJECT_ROOT), path=str(path))
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield process.stdout.readline().strip()
    finally:
        os.kill(process.pid, signal.SIGKILL)  # as a crashed training dies
        process.wait()


def test_two_threads_asking_at_once_get_one_lock_and_the_other_waits_for_its_release(tmp_path):
    path, barrier = tmp_path / "run.lock", threading.Barrier(8)
    got = []

    def member() -> None:  # a sweep member on a thread of the worker
        barrier.wait()
        got.append(try_lock(path))

    threads = [threading.Thread(target=member) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == [False] * 7 + [True]
    assert not try_lock(path)  # still held, by another claim of this process
    unlock(path)
    assert try_lock(path)
    unlock(path)


def test_a_thread_cannot_take_a_lock_another_thread_holds(tmp_path):
    path = tmp_path / "run.lock"
    held, refused = threading.Event(), []
    holder = threading.Thread(target=lambda: (try_lock(path), held.set()))
    holder.start()
    held.wait()
    other = threading.Thread(target=lambda: refused.append(not try_lock(path)))
    other.start()
    other.join()
    holder.join()
    assert refused == [True]
    unlock(path)  # the holder's release (any of its tasks may release it)
    assert try_lock(path)
    unlock(path)


def test_a_lock_holds_between_processes_and_a_killed_holder_leaves_it_free(tmp_path):
    path = tmp_path / "run.lock"
    with _other_process(path) as said:
        assert said == "held"
        assert not try_lock(path)
    assert try_lock(path)  # the holder was killed: the OS dropped its lock
    with _other_process(path) as said:
        assert said == "refused"
    unlock(path)
    with _other_process(path) as said:
        assert said == "held"


def test_unlock_without_holding_does_nothing(tmp_path):
    path = tmp_path / "run.lock"
    unlock(path)
    with _other_process(path) as said:
        assert said == "held"
        unlock(path)  # not this process's lock: the other one still holds it
        assert not try_lock(path)
