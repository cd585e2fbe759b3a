"""The prepared-data cache: read back when the same corpus and data settings come again, and safe when runs share it
(a sweep's members prepare the same corpus at once, and a run trains from memory-mapped arrays while another
prepares them again)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import small_config

from rnnlm.data import prepare_data

FILES = ["info.json", "test.npy", "train.npy", "val.npy", "vocab.json"]


def test_prepared_data_is_read_back_while_the_corpus_and_settings_are_the_same(tmp_path, small_corpus):
    config = small_config(tmp_path, small_corpus)
    data = prepare_data(small_corpus, config)
    inode = os.stat(data.train_path).st_ino
    again = prepare_data(small_corpus, config.model_copy(update={"batch_size": 4, "lr": 2.0}))  # not data settings
    assert again == data and again.reused and not data.reused
    assert os.stat(data.train_path).st_ino == inode  # not written again
    other = prepare_data(small_corpus, config.model_copy(update={"min_freq": 2}))
    assert other.folder != data.folder and not other.reused


def test_preparing_again_replaces_the_files_and_leaves_readers_theirs(tmp_path, small_corpus):
    """A preparation that did not finish (no info.json, written last) is done again: the new files are renamed into
    place, the arrays a run memory-mapped before stay whole (files rewritten in place would be truncated under the
    reader: a bus error), and no temporary file stays."""
    config = small_config(tmp_path, small_corpus)
    data = prepare_data(small_corpus, config)
    _, train, _ = data.load()
    before, inode = np.array(train), os.stat(data.train_path).st_ino
    data.info_path.unlink()
    again = prepare_data(small_corpus, config)
    assert again == data and not again.reused
    assert os.stat(data.train_path).st_ino != inode
    assert np.array_equal(train, before)
    assert sorted(p.name for p in Path(data.folder).iterdir()) == FILES


_CONCURRENT = """
import sys, threading
import numpy as np
sys.path.insert(0, sys.argv[3])
from helpers import small_config
from rnnlm.data import prepare_data

corpus, cache = sys.argv[1], sys.argv[2]
config = small_config(__import__("pathlib").Path(cache), corpus)
data = prepare_data(corpus, config)
expected = np.array(data.load()[1])
errors, done = [], threading.Event()

def prepare():
    try:
        for _ in range(20):
            data.info_path.unlink(missing_ok=True)  # as if the last preparation had not finished: prepare again
            assert prepare_data(corpus, config) == data
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
    tests = str(Path(__file__).parents[1])
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
