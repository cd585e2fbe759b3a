"""The speed-related code paths, checked on the CPU: no host sync inside an epoch, thread settings, bf16 autocast."""

import os
import subprocess
import sys

import pytest
import torch

from rnnlm import cpu
from rnnlm.config import TrainConfig
from rnnlm.cpu import compiled as engine_compiled
from rnnlm.cpu.allocator import keep_freed_memory
from rnnlm.cpu.threads import torch_threads
from rnnlm.model import RNNLM, matmul_precision
from rnnlm.tokens import build_vocab
from rnnlm.train import make_optimizer, train


@pytest.fixture(scope="module")
def corpus(char_ids):
    return char_ids(1500)


def _settings(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "num_steps": 10, "lr": 1.0, "grad_clip": 1.0, "num_epochs": 3, **kw})


def test_new_options_default_to_the_books_arithmetic():
    config = TrainConfig()
    assert config.amp is False and config.cpu_threads == 0  # auto: see the next test


@pytest.mark.parametrize("rnn", ["rnn", "lstm"])
def test_an_epoch_reads_the_device_once(corpus, rnn, monkeypatch):
    """Per batch nothing is read back to the host (on a GPU each read would stall it): one float() per epoch."""
    vocab_size, ids = corpus
    model = RNNLM(vocab_size, 16, rnn)
    reads = []
    for name in ("__float__", "item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1]
        )
    ids = ids.numpy()
    train(model, ids, ids[:0], _settings(num_epochs=1), make_optimizer(model, 1.0), torch.Generator().manual_seed(0))
    assert reads == ["__float__"]


def test_auto_threads_are_one_where_the_engine_serves_the_model_and_all_cores_else(monkeypatch):
    """cpu_threads 0: one torch thread where the compiled kernels take the second core for themselves, torch's own
    setting (all cores) where the model runs on torch's layers or has an adaptive softmax (on torch's matmuls); a
    number given is taken as it is."""
    import rnnlm.cpu as cpu

    window = (8, 10)
    with torch_threads(7):  # torch's own setting, as a library user may set it after importing rnnlm
        assert cpu.threads_for(0, RNNLM(9, 16, "rnn").double(), window) == 7  # float64: torch's layers
        assert cpu.threads_for(3, RNNLM(9, 16, "rnn"), window) == 3
        if cpu.compiled():
            assert cpu.threads_for(0, RNNLM(9, 16, "rnn"), window) == 1
            adaptive = RNNLM(20, 16, "rnn", embedding_dim=16, tie_weights=True, adaptive_cutoffs=[4, 8])
            assert cpu.handles(adaptive, torch.zeros(window, dtype=torch.int64))
            assert cpu.threads_for(0, adaptive, window) == 7  # its head and clusters on torch's matmuls: all threads
        monkeypatch.setattr(cpu, "ENABLED", False)
        assert cpu.threads_for(0, RNNLM(9, 16, "rnn"), window) == 7
    assert cpu.engine_name(RNNLM(9, 16, "rnn"), window) == "torch's layers (the compiled kernels are turned off)"


def test_auto_threads_follow_torchs_setting_as_the_outermost_run_found_it():
    """torch's own setting is read when a run starts, not when rnnlm was imported: a library user's later
    `torch.set_num_threads` holds. Inside a run (which sets its own threads), an evaluation's nested block still gives
    torch's layers the setting the run found; after the run, torch's setting is back and read afresh."""
    import rnnlm.cpu as cpu

    engine = RNNLM(9, 16, "rnn")  # one torch thread where the engine serves it
    layers = RNNLM(9, 16, "rnn").double()  # torch's layers: torch's own setting
    window = (8, 10)
    before = torch.get_num_threads()
    with torch_threads(5):
        assert cpu.default_threads() == 5 and cpu.threads_for(0, layers, window) == 5
        with cpu.settings(0, engine, window):
            assert torch.get_num_threads() == (1 if cpu.compiled() else 5)
            assert cpu.default_threads() == 5
            with cpu.settings(0, layers, window):  # e.g. evaluate() inside train()
                assert torch.get_num_threads() == 5
            assert torch.get_num_threads() == (1 if cpu.compiled() else 5)
        assert torch.get_num_threads() == 5
    assert torch.get_num_threads() == before and cpu.default_threads() == before
    with torch_threads(3):
        assert cpu.threads_for(0, layers, window) == 3


@pytest.mark.skipif(not engine_compiled(), reason="no C compiler here: the compiled kernels are not built")
@pytest.mark.parametrize("cutoffs", [[], [4, 8]])
def test_the_lstm_choice_times_the_engine_on_the_threads_it_will_train_with(monkeypatch, cutoffs):
    """The one-time measurement of an LSTM's path runs the engine's candidate as training will: one torch thread
    (and the helper) for a linear output layer, torch's own setting for an adaptive softmax."""
    import rnnlm.cpu as cpu

    seen = []

    def recording_loss(model, tokens, targets, state):
        seen.append(torch.get_num_threads())
        return torch.zeros((), requires_grad=True), state

    monkeypatch.setattr(cpu, "loss", recording_loss)
    model = RNNLM(20, 16, "lstm", num_layers=2, embedding_dim=16, tie_weights=True, adaptive_cutoffs=cutoffs)
    with torch_threads(3):
        cpu._lstm_candidates(model, 4)["compiled"]()
        assert seen == [3 if cutoffs else 1] and torch.get_num_threads() == 3
        assert cpu.threads_for(0, model, (4, 35)) in (seen[0], 3)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="this process may run on one core only")
def test_a_process_pinned_to_one_core_keeps_the_work_on_its_thread():
    """Under `taskset -c N` (or a cpuset of one core) the helper thread would only take turns with the calling thread
    on the same core: the engine counts the cores the process may use, not the machine's."""
    import rnnlm.cpu as cpu
    from rnnlm.cpu import threads

    window, allowed = (8, 10), os.sched_getaffinity(0)
    with torch_threads(1):
        assert threads.usable_cores() == len(allowed) and threads.second_core_free()
        os.sched_setaffinity(0, {min(allowed)})
        try:
            assert threads.usable_cores() == 1 and not threads.second_core_free()
            assert "helper" not in cpu.device_name(RNNLM(9, 16, "rnn"), 1, window)
            if cpu.compiled():
                assert "one core" in cpu.engine_name(RNNLM(9, 16, "rnn"), window)
        finally:
            os.sched_setaffinity(0, allowed)
        assert threads.second_core_free()


def test_cpu_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0 keeps torch's setting
        assert torch.get_num_threads() == before


def _five_epochs(corpus, amp: bool) -> tuple[list[float], RNNLM]:
    vocab_size, ids = corpus
    torch.manual_seed(0)
    model = RNNLM(vocab_size, 32, "lstm")
    optimizer, generator, ids = make_optimizer(model, 1.0), torch.Generator().manual_seed(0), ids.numpy()
    state = train(model, ids, ids[:0], _settings(amp=amp, num_epochs=5), optimizer, generator)
    return [stats.train_perplexity for stats in state.history], model


def test_bf16_autocast_trains_like_float32(corpus):
    """amp runs the LSTM's matmuls in bf16 here (results differ slightly: the compiled bf16 kernels on AVX512-BF16
    CPUs, torch's autocast without a compiler), or, where bf16 kernels would be slower, keeps float32 (the same
    results); weights and updates stay float32 either way."""
    fp32, _ = _five_epochs(corpus, amp=False)
    bf16, model = _five_epochs(corpus, amp=True)
    in_bf16 = matmul_precision(model, True, (8, 10)).startswith("bf16")
    assert (bf16 != fp32) == in_bf16 and bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16[-1] < 0.5 * bf16[0] and all(p.dtype == torch.float32 for p in model.parameters())


ONEDNN_BF16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="oneDNN has no bf16 here (no AVX512-BF16 or AMX): torch's bf16 LSTM does not run, and amp never asks it to",
)


@pytest.mark.skipif(not engine_compiled(), reason="no C compiler here: the compiled kernels are not built")
@pytest.mark.parametrize("bf16_path", ["compiled", pytest.param("torch", marks=ONEDNN_BF16)])
def test_amp_trains_the_books_lstm_on_the_path_measured_in_bf16(corpus, monkeypatch, bf16_path):
    """Under amp the book's one-layer LSTM takes the path its own choice under autocast names: the engine's bf16 step
    where that measured quicker, torch's bf16 LSTM where that did (as on a Xeon with AMX), whatever the float32
    choice says; the choice's 'compiled' candidate under autocast is that bf16 step."""
    from rnnlm.cpu import fused, native

    monkeypatch.setattr(native, "bf16_native", lambda: True)  # as on an AVX512-BF16 CPU, whatever this one is
    monkeypatch.setattr(cpu, "lstm_path", lambda model, batch: bf16_path if cpu._autocast_on() else "compiled")
    steps = []
    bf16_step = fused.sgd_step
    monkeypatch.setattr(fused, "sgd_step", lambda *args: steps.append(1) or bf16_step(*args))
    _, model = _five_epochs(corpus, amp=True)
    assert bool(steps) == (bf16_path == "compiled")
    in_words = matmul_precision(model, True, (8, 10))
    assert in_words.startswith("bf16 recurrent" if bf16_path == "compiled" else "bf16 autocast (forward pass, torch's")
    steps.clear()
    with cpu.autocast(True):
        assert cpu._lstm_choice(model, 8).endswith("@bf16")  # amp's own choice, measured apart from float32's
        cpu._lstm_candidates(model, 8)["compiled"]()
    assert steps == [1]


def test_amp_stays_float32_on_a_cpu_without_quick_bf16(corpus, monkeypatch):
    """Where the compiled kernels have no AVX512-BF16 (or do not serve), bf16 on the CPU is emulated and slower than
    float32: amp then trains in float32, the same numbers (torch's layers, which autocast would run in bf16)."""
    monkeypatch.setattr(cpu, "ENABLED", False)
    fp32, _ = _five_epochs(corpus, amp=False)
    bf16, model = _five_epochs(corpus, amp=True)
    assert bf16 == fp32 and matmul_precision(model, True, (8, 10)).startswith("float32 (no AVX512-BF16")


@pytest.mark.parametrize("rnn", ["rnn", "lstm"])
def test_prompts_of_equal_and_different_lengths_generate_as_if_alone(rnn):
    from rnnlm.generate import generate

    vocab = build_vocab("the time machine was a traveller", "char")
    torch.manual_seed(0)
    model = RNNLM(len(vocab), 16, rnn)
    prompts = ["the", "a", "was", "time", "the", "machine"]  # lengths repeat, in no order
    together = generate(model, vocab, prompts, num_preds=12)
    assert together == [generate(model, vocab, [p], num_preds=12)[0] for p in prompts]


_FAULTS_SCRIPT = """
import resource, sys, numpy as np, torch
import rnnlm.cpu
import rnnlm.train as T
from rnnlm.config import TrainConfig
from rnnlm.model import RNNLM
from rnnlm.cpu import allocator
if sys.argv[1] == "glibc-start":  # glibc's starting thresholds, pinned so its dynamic rule cannot raise them
    rnnlm.cpu.keep_freed_memory = lambda: False
    mallopt = allocator._mallopt()
    for setting in (allocator._M_MMAP_THRESHOLD, allocator._M_TRIM_THRESHOLD):
        assert mallopt(setting, 128 * 1024) == 1
torch.manual_seed(0)
ids = np.random.default_rng(0).integers(0, 28, 4000)
model = RNNLM(28, 256, "gru")
settings = TrainConfig(batch_size=32, num_steps=35, lr=1.0, grad_clip=1.0, num_epochs=3)
optimizer, generator = T.make_optimizer(model, 1.0), torch.Generator().manual_seed(0)
T.train(model, ids, ids[:0], settings, optimizer, generator)  # warm-up, 3 epochs: first touches are expected
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
T.train(model, ids, ids[:0], settings.model_copy(update={"num_epochs": 10}), optimizer, generator)
print(allocator._applied == [True], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc's mallopt is not available (not glibc)")
def test_training_reuses_its_pages_instead_of_faulting_in_new_ones():
    """The book's GRU (9.1) on the CPU, the same epochs in two fresh processes: with the setting, the pages freed by
    one minibatch serve the next. The other process keeps glibc's starting thresholds (128 KB), pinned: left alone,
    glibc's dynamic rule raises them or not depending on the order of the first frees (9,000-135,000 faults over the
    10 epochs after the warm-up on one machine, 1,739 on another), so only the pinned start makes a fair contrast.
    The setting faulted in 98-940 pages here, the pinned start about 200,000."""
    faults, applied = {}, {}
    for mode in ("glibc-start", "keep"):
        done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        applied[mode], faults[mode] = done.stdout.split()[-2] == "True", int(done.stdout.split()[-1])
    assert applied == {"glibc-start": False, "keep": True}  # training itself set it
    assert faults["keep"] * 5 < faults["glibc-start"], faults
