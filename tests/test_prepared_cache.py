"""The prepared-data cache when runs share it: a sweep's members prepare the same corpus at once, and a run trains
from memory-mapped arrays while another prepares them again."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import small_config

from rnnlm import experiment

FILES = ["info.json", "train.npy", "val.npy", "vocab.json"]


def test_preparing_again_replaces_the_files_and_leaves_readers_theirs(tmp_path, small_corpus):
    """The second preparation renames new files into place: the arrays a run memory-mapped before stay whole (the
    files were rewritten in place, which truncates them under the reader: a bus error), and no temporary file stays."""
    config = small_config(tmp_path, small_corpus)
    data = experiment.prepare_data(small_corpus, config)
    _, train, _ = data.load()
    before, inode = np.array(train), os.stat(data.train_path).st_ino
    assert experiment.prepare_data(small_corpus, config) == data
    assert os.stat(data.train_path).st_ino != inode
    assert np.array_equal(train, before)
    assert sorted(p.name for p in Path(data.folder).iterdir()) == FILES


_CONCURRENT = """
import sys, threading
import numpy as np
sys.path.insert(0, sys.argv[3])
from conftest import small_config
from rnnlm import experiment

corpus, cache = sys.argv[1], sys.argv[2]
config = small_config(__import__("pathlib").Path(cache), corpus)
data = experiment.prepare_data(corpus, config)
expected = np.array(data.load()[1])
errors, done = [], threading.Event()

def prepare():
    try:
        for _ in range(20):
            assert experiment.prepare_data(corpus, config) == data
    except BaseException as exc:
        errors.append(exc)

def read():  # a training run's view: the arrays memory-mapped, read again and again
    while not done.is_set():
        try:
            train = data.load()[1]
            if not np.array_equal(train, expected):
                errors.append("a reader saw other arrays")
        except (OSError, ValueError) as exc:  # a file caught between writes
            errors.append(exc)

readers = [threading.Thread(target=read) for _ in range(2)]
writers = [threading.Thread(target=prepare) for _ in range(3)]
for t in readers + writers:
    t.start()
for t in writers:
    t.join()
done.set()
for t in readers:
    t.join()
print(errors or "ok")
"""


def test_runs_preparing_and_reading_the_same_corpus_at_once(tmp_path, small_corpus):
    """Three threads prepare the same corpus 20 times each while two others read the arrays: every preparation gives
    the same result and every reader whole arrays, and the process survives (in a child: a bus error would kill
    pytest)."""
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _CONCURRENT, str(small_corpus), str(tmp_path), tests],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        done.returncode,
        done.stdout[-2000:],
        done.stderr[-2000:],
    )
    data_folders = list((tmp_path / "cache" / "prepared").iterdir())
    assert len(data_folders) == 1 and sorted(p.name for p in data_folders[0].iterdir()) == FILES
