"""The compiled kernels' build and maths: tanh accuracy, the build cache, and the fallback without a compiler."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnlm import cpu
from rnnlm.cpu import native, threads

needs_build = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the kernels are not built")


@needs_build
def test_tanh_is_float32_accurate():
    x = torch.linspace(-20, 20, 400_001)
    torch.testing.assert_close(native.tanh(x), torch.tanh(x), atol=1e-6, rtol=1e-6)
    tiny = torch.tensor([1e-30, -3e-8, 1e-4])  # small inputs keep their relative precision
    torch.testing.assert_close(native.tanh(tiny), torch.tanh(tiny), atol=0, rtol=1e-6)


@needs_build
def test_build_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_KERNEL_CACHE", str(tmp_path))
    compiler = native._compiler()
    first = native.build(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build(compiler) == first and first.stat().st_mtime_ns == stamp  # served from the cache
    monkeypatch.setattr(native, "_cpu_features", lambda: "flags : another cpu")
    assert native.build(compiler) != first  # another CPU never gets this CPU's build
    # no temporary left behind: the libraries and their records only
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".so", ".so"]


@needs_build
@pytest.mark.parametrize("trans", [True, False], ids=["transposed", "as-is"])
@pytest.mark.parametrize("shape", [(1024, 256), (75, 37)])
def test_bf16_packing_gives_the_kernels_layout(shape, trans):
    """pack_bf16's words are the layout kernels.c describes, built here from torch's bf16 rounding: B = W.T (trans)
    or W, its k-pairs (rows 2kk, 2kk + 1) in the low and high halves of a word, in panels of whole-vector columns,
    zeros past the edges (odd sizes run the edge code)."""
    weight = torch.randn(*shape)
    b = weight.T if trans else weight
    (k, n), width = b.shape, native._padded(1)
    padded = torch.zeros(k + k % 2, native._padded(n))
    padded[:k, :n] = b
    bits = padded.bfloat16().view(torch.int16).to(torch.int64) & 0xFFFF
    words = bits[0::2] | bits[1::2] << 16  # (pairs, padded n), as unsigned 32-bit values
    words = (words - (words >= 2**31).long() * 2**32).to(torch.int32)
    expected = words.reshape(words.shape[0], -1, width).transpose(0, 1).reshape(-1)
    assert torch.equal(native.pack_bf16(weight, trans=trans), expected)


@needs_build
def test_token_grad_adds_rows_where_the_tokens_point():
    tokens = torch.tensor([2, 0, 2, 1])
    grad = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out = native.token_grad(tokens, grad[:, 1:4], torch.zeros(3, 6)[:, :3])  # column slices, as the GRU passes
    expected = torch.zeros(3, 3).index_add_(0, tokens, grad[:, 1:4])
    torch.testing.assert_close(out, expected)


_FALLBACK = """
import warnings, torch
from rnnlm import cpu
from rnnlm.model import RNNLM
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    enabled = cpu.compiled()
model = RNNLM(7, 8, "rnn")
logits, _ = model(torch.randint(0, 7, (2, 9)), model.begin_state(2))
logits.sum().backward()
print(enabled, model.rnn.weight_hh_l0.grad.abs().sum().item() > 0, "|".join(str(w.message) for w in caught))
"""


def test_without_a_working_compiler_the_model_falls_back_with_a_warning(tmp_path):
    env = {**os.environ, "CC": "/bin/false", "RNNLM_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, check=True)
    enabled, trained, message = done.stdout.strip().split(" ", 2)
    assert (enabled, trained) == ("False", "True")
    assert "compiled RNN kernels are unavailable" in message and "torch's layers" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-built left in the cache


_ABORT = """
import sys, torch
from rnnlm.cpu import native, threads
failing = int(sys.argv[1])
steps, batch, hidden, vocab = 6, 4, 32, 5
tokens, h0, c0 = torch.randint(0, vocab, (steps, batch)), torch.zeros(batch, hidden), torch.zeros(batch, hidden)
emb, w_hh = torch.randn(vocab, 4 * hidden), torch.randn(4 * hidden, hidden)
hs, cs, tcs, gates = (torch.empty(steps, batch, n) for n in (hidden, hidden, hidden, 4 * hidden))

def prepare(units, worker, workers, flags):
    if worker == failing:
        def fail():
            raise RuntimeError(f"worker {worker} could not start")
        return fail
    return native.lstm_forward(tokens, h0, c0, emb, w_hh, hs, cs, gates, tcs, units, worker, workers, flags)

try:
    threads.by_units(hidden, True, prepare)
except RuntimeError as exc:
    print("raised:", exc)
"""


@needs_build
@pytest.mark.parametrize("failing", [0, 1], ids=["this-thread", "helper-thread"])
def test_a_worker_that_fails_to_start_releases_the_other(failing):
    """The halves of a GRU/LSTM window wait for each other at every step; if one half fails (this thread's or the
    helper thread's), the other must stop waiting for it (it would spin forever) and the error must reach the
    caller."""
    command = [sys.executable, "-c", _ABORT, str(failing)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"raised: worker {failing} could not start"


def _host_has(flag: str) -> bool:
    """Whether this CPU reports `flag` (Linux's /proc/cpuinfo names) and so can run code built for it."""
    return flag in native._cpu_features().split()


@needs_build
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="these builds are x86 variants")
@pytest.mark.parametrize(
    "flag, width, needs",
    [("-mno-avx512f", "16", "avx2"), ("-mno-avx512bf16", "32", "avx512f")],
    ids=["avx2", "avx512-without-bf16"],
)
def test_builds_for_other_x86_cpus_give_torchs_results_too(tmp_path, flag, width, needs):
    """Machines without AVX-512 get 8-wide vectors and 6-row blocks, and machines without AVX512-BF16 get the bf16
    matmuls emulated on float32 FMAs (other code paths of kernels.c): built here with those instructions turned off,
    the kernels must still give torch's outputs and gradients, the bf16 ones and the fused training step included.
    A build is only tested where the host can run it: the AVX-512 one needs an AVX-512 CPU."""
    if not _host_has(needs):
        pytest.skip(f"this CPU has no {needs}: it cannot run a build that uses it")
    env = {**os.environ, "CC": f"{' '.join(native._compiler())} {flag}", "RNNLM_KERNEL_CACHE": str(tmp_path)}
    probe = (
        "from rnnlm.cpu import native; lib = native.library(); print(lib.rnnlm_panel_width(), lib.rnnlm_bf16_native())"
    )
    built = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert built.stdout.split() == [width, "0"]  # the panel width of the vector path, and no native bf16
    tests = [str(Path(__file__).with_name(name)) for name in ("test_recurrence.py", "test_fused.py")]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", "compiled"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", *tests, "-k", "compiled"],
        capture_output=True,
        text=True,
    ).stdout
    assert "bf16" in collected and "fused" in collected  # the bf16 tests and the fused step's were among those run


def test_the_kernel_cache_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_KERNEL_CACHE", str(tmp_path / "new" / "kernels"))
    assert native.cache() == tmp_path / "new" / "kernels"
    assert (tmp_path / "new" / "kernels").stat().st_mode & 0o777 == 0o700


_LOAD = """
import warnings
from rnnlm.cpu import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = native.library()
print(lib is not None and lib.rnnlm_panel_width() > 0, native.cache(), "|".join(str(w.message) for w in caught))
"""


def _load_in_child(cache) -> tuple[str, str, str]:
    """(whether the kernels loaded and run, the cache folder used, the warnings) in a fresh process."""
    env = {**os.environ, "RNNLM_KERNEL_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=True)
    loaded, used, *warned = done.stdout.strip().split(" ", 2)
    return loaded, used, "".join(warned)


@needs_build
def test_a_cache_folder_others_can_write_is_not_used(tmp_path):
    """Another user could plant code there: the kernels are built in a private folder instead, with a warning."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    loaded, used, warned = _load_in_child(shared)
    assert loaded == "True" and Path(used) != shared
    assert f"the kernel cache {shared} can be written by group or others (mode 0o777)" in warned
    assert list(shared.iterdir()) == []


@needs_build
@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="only root can give a folder to another user")
def test_a_cache_folder_of_another_user_is_not_used(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)  # nobody's
    loaded, used, warned = _load_in_child(theirs)
    assert loaded == "True" and Path(used) != theirs
    assert "belongs to another user (uid 65534)" in warned
    assert list(theirs.iterdir()) == []


_PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
int rnnlm_panel_width(void) { return 1; }
"""


@needs_build
@pytest.mark.parametrize("record", ["kept", "removed"])
def test_a_planted_library_under_the_expected_name_is_not_loaded(tmp_path, monkeypatch, record):
    """A library that is not what this process built (another file under the built one's name, with its record
    left beside it or gone) is rebuilt, never loaded: the planted one would leave a marker when loaded."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    monkeypatch.setenv("RNNLM_KERNEL_CACHE", str(cache))
    built = native.build(native._compiler())
    source = tmp_path / "planted.c"
    source.write_text(_PLANTED)
    compiler = [*native._compiler(), f'-DMARKER="{marker}"', "-shared", "-fPIC", "-o", str(built), str(source)]
    subprocess.run(compiler, check=True, capture_output=True)
    if record == "removed":
        built.with_suffix(".json").unlink()
    loaded, used, _ = _load_in_child(cache)
    assert (loaded, Path(used)) == ("True", cache)  # the kernels, rebuilt in place
    assert not marker.exists()
    assert native._vouched_for(built, json.loads(built.with_suffix(".json").read_text())["build"])


_SHORT_TEAM = """
import torch
from rnnlm.cpu import native, recurrence, threads
torch.manual_seed(0)
steps, batch, hidden, vocab = 7, 5, 24, 6
table, tokens = torch.randn(vocab, 4 * hidden), torch.randint(0, vocab, (steps, batch))
h0, c0, w_hh = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.randn(4 * hidden, hidden)
ran = []
real = native.team
native.team = lambda windows: ran.append(real(windows)) or ran[-1]

def window(torch_threads):
    w = w_hh.clone().requires_grad_()
    with threads.torch_threads(torch_threads):
        hs, c = recurrence.LSTM.apply(table, tokens, h0, c0, w, False)
        (hs.square().sum() + c.sum()).backward()
    return hs.detach(), w.grad

with threads.torch_threads(2):
    team_free = threads.team_free()
two, one = window(2), window(1)
print(team_free, ran, all(torch.equal(a, b) for a, b in zip(two, one)))
"""


@needs_build
def test_a_team_that_comes_out_short_runs_the_windows_on_the_helper_thread():
    """Where OpenMP gives a smaller team than two (here OMP_THREAD_LIMIT=1), the kernels run none of the window
    (its workers would wait for each other forever) and say so; the window then runs on this thread and the helper
    thread, to the same numbers as on one thread."""
    if not native.shares_torch_threads():
        pytest.skip("the kernels do not share torch's OpenMP runtime here: no team is tried")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", _SHORT_TEAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "[False,", "False]", "True"]  # tried twice (forward, backward), same numbers


@needs_build
def test_kernels_built_without_openmp_keep_the_windows_off_the_team(monkeypatch):
    """A compiler without OpenMP still builds the kernels (without it): they run no team, and the windows are not
    handed to one (`shares_torch_threads`, which `team_free` asks, says no)."""
    import ctypes

    compiler = native._compiler()
    lib = ctypes.CDLL(str(native._build(compiler, native._FLAGS)))
    assert lib.rnnlm_team_threads() == -1
    assert lib.rnnlm_team(2, (ctypes.c_int64 * 48)()) == 1  # nothing run
    monkeypatch.setattr(native, "library", lambda: lib)
    assert native.shares_torch_threads.__wrapped__() is False
    monkeypatch.setattr(native, "shares_torch_threads", native.shares_torch_threads.__wrapped__)
    with threads.torch_threads(2):
        assert not threads.team_free()


@needs_build
def test_an_openmp_build_whose_runtime_cannot_load_gives_way_to_the_build_without(tmp_path):
    """Where the OpenMP build compiles but its OpenMP runtime cannot be loaded (here: a compiler that links the
    OpenMP build against a library the loader cannot find), the kernels load from the build without OpenMP."""
    ghost = tmp_path / "lib"
    ghost.mkdir()
    stub = tmp_path / "ghost.c"
    stub.write_text("int rnnlm_ghost(void) { return 1; }\n")
    compiler = native._compiler()
    subprocess.run([*compiler, "-shared", "-fPIC", "-o", str(ghost / "libghost.so"), str(stub)], check=True)
    wrapper = tmp_path / "cc"
    extra = f"-L{ghost} -Wl,--no-as-needed -lghost"  # only where -fopenmp is asked for
    case = f'case " $* " in *" -fopenmp "*) extra="{extra}";; esac'
    script = ["#!/bin/sh", case, f'exec {" ".join(compiler)} "$@" $extra']
    wrapper.write_text("\n".join(script) + "\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "RNNLM_KERNEL_CACHE": str(tmp_path / "cache")}
    probe = "from rnnlm.cpu import native; lib = native.library(); print(lib is not None, lib.rnnlm_team_threads())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "-1"]  # loaded, and without OpenMP


@needs_build
def test_the_losss_halves_give_torchs_cross_entropy_and_the_same_sums_on_torchs_threads_or_in_turn():
    """The large output layer's loss without the helper thread: its two halves on torch's two OpenMP threads (where
    they are free) or one after the other give the same sums to the bit, and torch's summed cross-entropy, its
    gradient (softmax minus one-hot, scaled) and the bias's gradient to float32 rounding."""
    torch.manual_seed(0)
    rows, vocab, scale = 301, 517, 1.0 / 301  # an odd row count: the halves differ in size
    logits, targets = torch.randn(rows, vocab), torch.randint(0, vocab, (rows,))
    results = []
    for team in (True, False):
        with threads.torch_threads(2):
            grads, loss, grad_b = logits.clone(), torch.zeros(16, dtype=torch.float64), torch.zeros(2, vocab)
            native.rows_loss_halves(grads, targets, scale, loss, grad_b, team and threads.team_free())
        results.append((grads, loss, grad_b))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    grads, loss, grad_b = results[0]
    x = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x, targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss.sum().float(), expected.detach())
    torch.testing.assert_close(grads, x.grad * scale)
    torch.testing.assert_close(grad_b.sum(0), (x.grad * scale).sum(0))
    assert loss[8] != 0 and grad_b[1].abs().sum() > 0  # the second half's sums went to its own slots


@needs_build
@pytest.mark.parametrize("batch", range(1, 18))
def test_a_window_gives_torchs_numbers_for_every_row_count(batch):
    """The register blocks share a window's rows out evenly (20 rows on AVX2: 5 + 5 + 5 + 5): every count up to two
    blocks of the widest (AVX-512's 8 rows) and one more gives torch's tanh RNN steps."""
    torch.manual_seed(batch)
    steps, hidden, vocab = 3, 20, 7
    tokens, h0 = torch.randint(0, vocab, (steps, batch)), torch.randn(batch, hidden)
    emb, w_hh = torch.randn(vocab, hidden), torch.randn(hidden, hidden) * 0.3
    hs = torch.empty(steps, batch, hidden)
    native.rnn_forward(tokens, h0, emb, native.pack(w_hh, True), hs, (0, batch))
    h, expected = h0, []
    for t in range(steps):
        h = torch.tanh(h @ w_hh.T + emb[tokens[t]])
        expected.append(h)
    torch.testing.assert_close(hs, torch.stack(expected))


@needs_build
@pytest.mark.parametrize(("rows", "inputs", "outputs"), [(700, 200, 2002), (37, 13, 5), (1, 3, 33), (0, 4, 5)])
def test_the_kernels_linear_gives_torchs_products_with_the_same_bits_on_any_team(rows, inputs, outputs):
    """`native.linear` (a softmax's logits, a layer's input products) gives torch's x @ W.T + b to float32 rounding
    for rows that fill no whole block and outputs that fill no whole panel, and the same bits on one thread, torch's
    two, or three (a team that shares the rows out unevenly)."""
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
    for b in (bias, None):
        results = [native.linear(x, weight, b, team) for team in (1, 2, 3)]
        assert results[0].shape == (rows, outputs)
        torch.testing.assert_close(results[0], torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-4)
        assert all(torch.equal(results[0], other) for other in results[1:])


@needs_build
def test_the_kernels_linear_refuses_mismatched_sizes_and_types_before_any_c_runs():
    x, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        native.linear(x, torch.randn(5, 4), None, 2)
    with pytest.raises(RuntimeError, match="bias must have 5 elements"):
        native.linear(x, weight, torch.randn(4), 2)
    with pytest.raises(RuntimeError, match="float32 CPU x"):
        native.linear(x.double(), weight, None, 2)
    with pytest.raises(RuntimeError, match="float32 CPU weight of 2 dimensions"):
        native.linear(x, weight[None], None, 2)
    with pytest.raises(RuntimeError, match="1 thread or more, not 0"):
        native.linear(x, weight, None, 0)


@needs_build
def test_the_kernels_global_norm_is_torchs_with_the_same_bits_on_any_team():
    """`cpu.total_norm` (the clip's norm before AdamW's step) gives the exact norm to float32 rounding (torch's
    get_total_norm, summed in float32, drifts by 5e-5 over 2.5 million elements), over tensors of chunk and vector
    remainders, an empty one and none; and `native.sum_squares` gives the same bits on one thread, torch's two, or
    three."""
    torch.manual_seed(0)
    chunk = native.library().rnnlm_squares_chunk()
    tensors = [torch.randn(12769, 200), torch.randn(3 * chunk + 37), torch.randn(0), torch.randn(7, 5), torch.ones(1)]
    exact = sum(float(t.double().square().sum()) for t in tensors) ** 0.5
    ours, theirs = cpu.total_norm(tensors), torch.nn.utils.get_total_norm(tensors)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours, torch.tensor(exact, dtype=torch.float32), rtol=1e-7, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    sums = [native.sum_squares(tensors, team) for team in (1, 2, 3)]
    assert sums[0] == sums[1] == sums[2] and abs(sums[0] - exact**2) < 1e-9 * exact**2
    assert float(cpu.total_norm([])) == 0.0 and native.sum_squares(tensors[2:3], 2) == 0.0
    assert float(cpu.total_norm([torch.tensor([3.0, 4.0])])) == 5.0
    assert torch.isnan(cpu.total_norm([torch.tensor([1.0, float("nan")])]))
    assert torch.isinf(cpu.total_norm([torch.tensor([float("inf"), 1.0])]))
    with pytest.raises(RuntimeError, match="float32 tensors"):
        native.sum_squares([torch.ones(3, dtype=torch.float64)], 2)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors"):
        native.sum_squares([torch.ones(4, 4).T], 2)
    with pytest.raises(RuntimeError, match="1 thread or more"):
        native.sum_squares(tensors, 0)
    strided = torch.randn(6, 4).T  # not contiguous: torch's own norm
    torch.testing.assert_close(cpu.total_norm([strided]), strided.norm())
