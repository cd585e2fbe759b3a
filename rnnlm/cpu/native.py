"""The compiled recurrences of `kernels.c`: built with the machine's C compiler at first use, cached, called via ctypes.

No torch headers are involved, so the build takes under a second. The library goes to the kernel cache (`cache()`:
`$RNNLM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rnnlm/kernels`), named by a hash of the source, the compiler and the
CPU's features, so that a cache shared between machines never serves code built for another CPU. The cache is
private: made with mode 0700, and one that another user owns or can write is not used (the kernels are built in a
private temporary folder instead, with a warning). A library is loaded only when the sha256 recorded beside it when
it was built here matches it, with the hash of what built it; anything else under its name is rebuilt. Where no
compiler is found or the build fails, `library()` is None and the model uses torch's layers instead (one warning says
why); `RNNLM_NATIVE=0` turns the compiled kernels off.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from rnnlm.cpu import checks

SOURCE = Path(__file__).with_name("kernels.c")
# -fopenmp-simd: the `omp simd` reductions in kernels.c vectorise (no OpenMP runtime); the build tries -fopenmp on
# top first (the windows on torch's OpenMP threads, `team`), and goes without where the compiler has no OpenMP
_FLAGS = [
    "-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-shared",
    "-fPIC",
]  # fmt: skip

_i, _p = ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "rnnlm_panel_width": [],
    "rnnlm_bf16_native": [],
    "rnnlm_pack": [_p, _i, _i, _i, _p],
    "rnnlm_pack_bf16": [_p, _i, _i, _i, _p],
    "rnnlm_tanh": [_p, _p, ctypes.c_int64],
    "rnnlm_rnn_forward": [_i, _i, _i, _i, _i, _p, _p, _p, _p, _p, _p],
    "rnnlm_rnn_backward": [_i, _i, _i, _i, _i, _p, _p, _p, _p, _p, _p],
    "rnnlm_token_grad": [ctypes.c_int64, _i, _p, _p, ctypes.c_int64, _p, ctypes.c_int64],
    # the split windows: steps, batch, H, u0, u1, worker, workers, flags, then the arrays
    "rnnlm_gru_forward": [_i] * 7 + [_p] * 11,
    "rnnlm_gru_backward": [_i] * 7 + [_p] * 13,
    "rnnlm_lstm_forward": [_i] * 7 + [_p] * 11,
    "rnnlm_lstm_backward": [_i] * 7 + [_p] * 15,
    "rnnlm_lstm_backward_scratch": [_i] * 7,
    # the bf16 windows: steps, batch, H, V, r0, r1, then the arrays
    "rnnlm_lstm_forward_bf16": [_i] * 6 + [_p] * 15,
    "rnnlm_lstm_backward_bf16": [_i] * 6 + [_p] * 20,
    "rnnlm_weight_grad_bf16": [_i] * 6 + [_p] * 5,
    "rnnlm_lstm_sgd_work": [_i] * 6,
    "rnnlm_lstm_sgd_bf16": [_p, _i, _i, _p, _p],
    "rnnlm_sgd_f32_work": [_i] * 6,
    "rnnlm_lstm_sgd_f32": [_p, _i, _i, _p, _p],
    "rnnlm_rnn_sgd_f32": [_p, _i, _i, _p, _p],
    "rnnlm_barrier": [_p, _i, _i, ctypes.c_int64],
    "rnnlm_team_threads": [],
    "rnnlm_team": [_i, _p],
    # the output layer's step: n0, n1, H, V, hs, wout, b_out, wout_back, targets, scale, then the outputs
    "rnnlm_output_step": [ctypes.c_int64] * 2 + [_i] * 2 + [_p] * 5 + [ctypes.c_float] + [_p] * 6,
    "rnnlm_clip_sgd": [_i, _p, _p, _p, ctypes.c_float, ctypes.c_float],
    "rnnlm_sum_squares": [_i, _p, _p, _p, _i],
    "rnnlm_squares_chunk": [],
    "rnnlm_rows_loss": [ctypes.c_int64] * 2 + [_i] * 2 + [_p] * 2 + [ctypes.c_float] + [_p] * 2,
    "rnnlm_rows_loss_halves": [ctypes.c_int64] + [_i] * 2 + [_p] * 2 + [ctypes.c_float] + [_p] * 2 + [_i],
    "rnnlm_bernoulli": [_p, ctypes.c_int64, ctypes.c_double, ctypes.c_float, _p, _p, _p],
    "rnnlm_linear": [_i] * 3 + [_p] * 5 + [_i],
}
_RESULTS = {name: _i for name in ("rnnlm_panel_width", "rnnlm_bf16_native", "rnnlm_barrier", "rnnlm_team_threads")}
_RESULTS["rnnlm_team"] = _i
_RESULTS["rnnlm_lstm_sgd_work"] = _RESULTS["rnnlm_sgd_f32_work"] = ctypes.c_int64
_RESULTS["rnnlm_lstm_backward_scratch"] = ctypes.c_int64
_RESULTS["rnnlm_clip_sgd"] = _RESULTS["rnnlm_sum_squares"] = ctypes.c_double
_RESULTS["rnnlm_squares_chunk"] = ctypes.c_int64


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's flags line (Linux), else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
    """$CC (which may carry flags), else the first of cc, gcc and clang on the PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def requested_cache() -> Path:
    """Where the kernels and the measured choices are asked to go: `$RNNLM_KERNEL_CACHE`, else
    `$XDG_CACHE_HOME/rnnlm/kernels` (`~/.cache/rnnlm/kernels`)."""
    if os.environ.get("RNNLM_KERNEL_CACHE"):
        return Path(os.environ["RNNLM_KERNEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnnlm" / "kernels"


_instead: dict[Path, Path] = {}  # an unsafe requested cache -> the private folder this process uses instead


def cache() -> Path:
    """The kernel cache in use: `requested_cache()`, made with mode 0700, when only this user can write it; else
    (another user owns it, or group or others can write it) a private temporary folder for this process, with a
    warning saying why."""
    folder = requested_cache()
    problem = _not_private(folder)
    if problem is None:
        return folder
    if folder not in _instead:
        _instead[folder] = Path(tempfile.mkdtemp(prefix="rnnlm-kernels-"))
        atexit.register(shutil.rmtree, _instead[folder], ignore_errors=True)
        warnings.warn(
            f"the kernel cache {folder} {problem}: the kernels are built in {_instead[folder]} for this process "
            "instead (make it yours with mode 700, or set RNNLM_KERNEL_CACHE to a private folder)",
            stacklevel=2,
        )
    return _instead[folder]


def _not_private(path: Path) -> str | None:
    """Why `path` (made if missing, mode 0700) is not this user's alone, in words; None when it is."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        return f"cannot be used ({exc})"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"can be written by group or others (mode {oct(info.st_mode & 0o777)})"
    return None


def build(compiler: list[str]) -> Path:
    """The compiled library for this source, compiler and CPU, with OpenMP where the compiler has it (else
    without): from the cache where its record vouches for it, or built into it atomically (the library, then its
    record)."""
    try:
        return _build(compiler, [*_FLAGS, "-fopenmp"])
    except RuntimeError:
        return _build(compiler, _FLAGS)


def _build(compiler: list[str], flags: list[str]) -> Path:
    """`build` with these flags."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [SOURCE.read_text(), " ".join(compiler), version, " ".join(flags), _cpu_features()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    target = cache() / f"kernels-{key[:16]}.so"
    if not _vouched_for(target, key):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [*compiler, *flags, "-o", str(built), str(SOURCE)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(compiler)} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
            record = Path(tmp) / "record.json"
            record.write_text(json.dumps({"build": key, "sha256": _sha256(built)}))
            os.replace(built, target)  # a reader sees the whole library or none
            os.replace(record, _record(target))
    return target


def _record(library_path: Path) -> Path:
    """The file beside a built library that records what built it and the library's sha256."""
    return library_path.with_suffix(".json")


def _vouched_for(path: Path, key: str) -> bool:
    """Whether `path` is the library this process would build for `key`: its record says so, and the file's sha256
    is the one recorded when it was built; both files this user's, writable by no one else."""
    try:
        record = json.loads(_record(path).read_text())
        return all(_own_file(p) for p in (path, _record(path))) and record == {"build": key, "sha256": _sha256(path)}
    except (OSError, ValueError):
        return False


def _own_file(path: Path) -> bool:
    info = path.stat()
    return (not hasattr(os, "getuid") or info.st_uid == os.getuid()) and not info.st_mode & 0o022


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


unavailable: list[str] = []  # why library() is None, once it is


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (turned off, no compiler, or a failed build: the reason is warned once and kept
    in `unavailable`)."""
    if not checks.native_setting():
        unavailable.append("turned off by RNNLM_NATIVE=0")
        return None
    compiler = _compiler()
    if compiler is None:
        unavailable.append("no C compiler found (cc, gcc, clang or $CC)")
        warnings.warn(f"{unavailable[0]}: the CPU recurrences run on torch's layers", stacklevel=2)
        return None
    try:
        try:
            lib = ctypes.CDLL(str(build(compiler)))
        except OSError:  # the OpenMP build's runtime (libgomp) cannot be loaded here: the build without it
            lib = ctypes.CDLL(str(_build(compiler, _FLAGS)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        unavailable.append(f"the kernels failed to build: {str(exc)[:300]}")
        warnings.warn(f"the compiled RNN kernels are unavailable ({exc}); using torch's layers", stacklevel=2)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _RESULTS.get(name)
    return lib


# float, int64_t, uint16_t, uint32_t, double in C
_DTYPES = (torch.float32, torch.int64, torch.bfloat16, torch.int32, torch.float64)


def _ptr(t: torch.Tensor | None) -> int | None:
    """The address C reads `t` at (None: NULL, a kernel's optional array): a contiguous CPU tensor of a type the
    kernels take, else RuntimeError (also under `python -O`)."""
    if t is None:
        return None
    _require(
        isinstance(t, torch.Tensor) and t.is_cpu and t.is_contiguous() and t.dtype in _DTYPES,
        lambda: f"the kernels take contiguous CPU tensors, got {_described(t)}",
    )
    return t.data_ptr()


def _require(condition: bool, message: Callable[[], str]) -> None:
    """RuntimeError(message()) unless `condition`: a check that `python -O` keeps."""
    if not condition:
        raise RuntimeError(message())


def _described(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    layout = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"a {layout} {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


@functools.cache
def _padded(n: int) -> int:
    """n columns rounded up to whole panels (the build's vector width sets the panel width)."""
    width = library().rnnlm_panel_width()
    return -(-n // width) * width


def _as_b(weight: torch.Tensor, trans: bool) -> tuple[torch.Tensor, int, int]:
    """`weight` ready to pack, and the (K, N) of B = weight.T (`trans`) or B = weight."""
    weight = weight.detach().contiguous()
    k, n = (weight.shape[1], weight.shape[0]) if trans else weight.shape
    return weight, k, n


def pack(weight: torch.Tensor, trans: bool) -> torch.Tensor:
    """`weight` as B = weight.T (`trans`) or B = weight, in the kernels' panel layout (K x N in panels of columns)."""
    weight, k, n = _as_b(weight, trans)
    out = packed(k, n)
    library().rnnlm_pack(_ptr(weight), k, n, int(trans), _ptr(out))
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """x @ weight.T + bias (bias None: none) for float32 x (rows, K), weight (N, K) and bias (N,), on `threads`
    OpenMP threads (kernels.c: rnnlm_linear): (rows, N), a view of rows padded to whole panels where N is not a
    whole number of panels. Sizes and types are checked first."""
    for name, t, dims in (("x", x, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if t is not None and not (t.dim() == dims and t.dtype == torch.float32 and t.device.type == "cpu"):
            raise RuntimeError(f"linear takes a float32 CPU {name} of {dims} dimensions, got {_described(t)}")
    (rows, k), n = x.shape, weight.shape[0]
    _require(weight.shape[1] == k, lambda: f"mat1 and mat2 shapes cannot be multiplied ({rows}x{k} and "
                                           f"{weight.shape[1]}x{n})")  # fmt: skip
    _require(bias is None or bias.shape[0] == n, lambda: f"the bias must have {n} elements, got {tuple(bias.shape)}")
    _require(threads >= 1, lambda: f"linear runs on 1 thread or more, not {threads}")
    x, weight = x.detach().contiguous(), weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    out, work = torch.empty(rows, _padded(n)), packed(k, n)
    library().rnnlm_linear(rows, k, n, _ptr(x), _ptr(weight), _ptr(bias), _ptr(work), _ptr(out), threads)
    return out if out.shape[1] == n else out[:, :n]


def packed(k: int, n: int) -> torch.Tensor:
    """A buffer for a K x N matrix in `pack`'s layout."""
    return torch.empty(_padded(n) * k)


def packed_bf16(k: int, n: int) -> torch.Tensor:
    """A buffer for a K x N matrix in `pack_bf16`'s layout."""
    return torch.empty(_padded(n) * ((k + 1) // 2), dtype=torch.int32)


def instruction_set() -> str:
    """What the build's matmuls use, in words: 'AVX-512, 16-wide' or 'AVX2, 8-wide', and the bf16 dot products."""
    width = library().rnnlm_panel_width() // 2
    x86 = platform.machine() in ("x86_64", "AMD64")
    name = {16: "AVX-512", 8: "AVX2"}.get(width) if x86 else None
    name = name or f"{platform.machine()}, {width}-wide vectors"
    return f"{name} float32" + (" and AVX512-BF16" if bf16_native() else "")


def bf16_native() -> bool:
    """Whether the kernels' bf16 matmuls run on AVX512-BF16 here (elsewhere they are emulated: right, but slower than
    float32)."""
    return library() is not None and bool(library().rnnlm_bf16_native())


def pack_bf16(weight: torch.Tensor, trans: bool) -> torch.Tensor:
    """As `pack`, in bf16 for the bf16 kernels: panels of k-pairs, each 32-bit word two bf16 (see kernels.c)."""
    weight, k, n = _as_b(weight, trans)
    out = packed_bf16(k, n)
    library().rnnlm_pack_bf16(_ptr(weight), k, n, int(trans), _ptr(out))
    return out


def even(n: int) -> int:
    """The row length of a bf16 buffer holding n columns: rounded up to even (the kernels read pairs)."""
    return n + (n & 1)


def scratch(rows: int, n: int) -> torch.Tensor:
    """A work buffer for `rows` rows of n columns, padded to whole panels."""
    return torch.empty(rows * _padded(n))


def tanh(x: torch.Tensor) -> torch.Tensor:
    """The kernels' tanh, elementwise (for tests of its accuracy)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().rnnlm_tanh(_ptr(x), _ptr(out), x.numel())
    return out


# torch's CPU generator state (its bytes): the position of its mt19937 and its 624 words, as uint64 each
_STATE_BYTES, _LEFT, _NEXT, _WORDS = 5056, slice(8, 12), slice(16, 24), slice(24, 24 + 624 * 8)


def bernoulli_(out: torch.Tensor, p: float, value: float = 1.0) -> torch.Tensor:
    """`out.bernoulli_(p)` for a contiguous float32 CPU tensor, with the bits torch draws from its default generator,
    which is left where torch's own call leaves it (kernels.c: rnnlm_bernoulli), about 10x quicker; `value` (a
    float32 number) in place of each 1. torch's own call for a p outside [0, 1] (its error) or a generator state of
    another layout than torch 2's."""
    _require(out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu",
             lambda: f"bernoulli_ takes a contiguous float32 CPU tensor, not {_described(out)}")  # fmt: skip
    state = torch.default_generator.get_state()
    if not 0 <= p <= 1 or state.numel() != _STATE_BYTES:
        return torch_bernoulli_(out, p, value)
    left, position = state[_LEFT].view(torch.int32), state[_NEXT].view(torch.int64)
    words = state[_WORDS].view(torch.int64)
    library().rnnlm_bernoulli(_ptr(out), out.numel(), float(p), value, _ptr(words), _ptr(left), _ptr(position))
    torch.default_generator.set_state(state)
    return out


def torch_bernoulli_(out: torch.Tensor, p: float, value: float = 1.0) -> torch.Tensor:
    """torch's own `out.bernoulli_(p)`, times `value` (1 * value is value exactly: the same bits as the kernels')."""
    out.bernoulli_(p)
    return out if value == 1.0 else out.mul_(value)


def rnn_forward(tokens, h0, emb, whh, hs, rows: tuple[int, int]) -> None:
    """Fill hs (steps, batch, H) for batch rows `rows` (see kernels.c: rnnlm_rnn_forward)."""
    steps, batch, hidden = hs.shape
    args = (tokens, h0, emb, whh, hs, scratch(rows[1] - rows[0], hidden))
    library().rnnlm_rnn_forward(steps, batch, hidden, *rows, *map(_ptr, args))


def rnn_backward(hs, grad_out, whh, g, grad_h0, rows: tuple[int, int]) -> None:
    """Fill g (steps, batch, H) and grad_h0 for batch rows `rows` (see kernels.c: rnnlm_rnn_backward)."""
    steps, batch, hidden = hs.shape
    args = (hs, grad_out, whh, g, grad_h0, scratch(rows[1] - rows[0], hidden))
    library().rnnlm_rnn_backward(steps, batch, hidden, *rows, *map(_ptr, args))


def token_grad(tokens: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[tokens[i]] += grad[i] for 2-D grad (rows, N) and out (vocab, N), both with unit column stride (column
    slices are fine); returns out. The ids are trusted to be rows of out (the windows checked them)."""
    _require(
        grad.stride(1) == 1 and out.stride(1) == 1 and grad.shape[1] == out.shape[1] and grad.dtype == out.dtype,
        lambda: f"token_grad takes rows of unit stride and equal width, got {_described(grad)}, {_described(out)}",
    )
    tokens = tokens.reshape(-1).contiguous()
    _require(tokens.dtype == torch.int64 and tokens.numel() == grad.shape[0], lambda: "one int64 token per row")
    lib, (rows, n) = library(), grad.shape
    lib.rnnlm_token_grad(rows, n, _ptr(tokens), grad.data_ptr(), grad.stride(0), out.data_ptr(), out.stride(0))
    return out


Call = Callable[[], None]


_TEAM_ARGS = 24  # int64 words a window takes in `team` (kernels.c: TEAM_ARGS)
_TEAM_KINDS = {"rnnlm_lstm_forward": 0, "rnnlm_lstm_backward": 1, "rnnlm_gru_forward": 2, "rnnlm_gru_backward": 3}


class Window:
    """One worker's C window, every argument checked and converted when it is made: calling it only runs it (a
    worker that failed after its partner started would leave the partner waiting at the first step); `team` runs
    several at once on torch's OpenMP threads."""

    def __init__(self, name: str, shape, units: tuple[int, int], worker: int, workers: int, flags, arrays) -> None:
        """The C window `name` over (steps, batch, H) = `shape` for one worker."""
        self._name, self._fn = name, getattr(library(), name)
        self._head = (*shape, *units, worker, workers, 0 if flags is None else flags.data_ptr())
        self._pointers = [_ptr(t) for t in arrays]
        self._keep_alive = (arrays, flags)  # the tensors must outlive the call: the pointers are all C sees

    def __call__(self) -> None:
        self._fn(*self._head, *self._pointers)

    def words(self) -> list[int]:
        """The window as `team` hands it to C: its kind, its sizes and flags, its arrays, TEAM_ARGS words in all."""
        words = [_TEAM_KINDS[self._name], *self._head, *(p or 0 for p in self._pointers)]
        return words + [0] * (_TEAM_ARGS - len(words))


_check_lock = threading.Lock()


@functools.cache
def shares_torch_threads() -> bool:
    """Whether the kernels were built with OpenMP and share torch's OpenMP runtime (one libgomp in the process):
    the OpenMP thread count they see follows each torch.set_num_threads. Checked once (under a lock: the check
    changes torch's setting for a moment), torch's setting restored."""
    lib = library()
    if lib is None or lib.rnnlm_team_threads() < 1:
        return False
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    with _check_lock:
        before = torch.get_num_threads()
        try:
            for count in (before + 1, before):
                torch.set_num_threads(count)
                if lib.rnnlm_team_threads() != count:
                    return False
        finally:
            torch.set_num_threads(before)
    return True


def team(windows: list[Window]) -> bool:
    """Run the workers' windows at once, window w on thread w of an OpenMP team of this thread (torch's own
    threads, where `shares_torch_threads`); False, with none of them run, where the team came out smaller."""
    words = (ctypes.c_int64 * (_TEAM_ARGS * len(windows)))(*(w for window in windows for w in window.words()))
    return library().rnnlm_team(len(windows), words) == 0


def _forward_window(name: str, gates: int, w_hh, inputs, outputs, units, worker, workers, flags) -> Window:
    """One worker's forward window `name` over hidden units `units`: `inputs` (tokens first, None for dense input
    rows), then W_hh, then `outputs` (hs first) and a work buffer, in which the worker packs its rows of W_hh."""
    hs, hidden = outputs[0], w_hh.shape[1]
    work = scratch(hs.shape[1] + hidden, gates * (units[1] - units[0]))
    return Window(name, hs.shape, units, worker, workers, flags, (*inputs, _weight(w_hh), *outputs, work))


def _weight(w_hh: torch.Tensor) -> torch.Tensor:
    """W_hh as the windows read it: contiguous, outside autograd."""
    return w_hh.detach().contiguous()


def _backward_window(
    name: str, w_hh, inputs, outputs, carried: int, units, worker, workers, flags, work: int | None = None
) -> Window:
    """One worker's backward window `name` over hidden units `units`: `inputs` (a (steps, batch, H) state second),
    W_hh, `outputs`, then `carried` (batch, units) buffers and a work buffer (`work` floats, else the step's
    product and the worker's columns of W_hh, packed there)."""
    shape = inputs[1].shape
    batch, width = shape[1], units[1] - units[0]
    buffers = [torch.empty(batch * width) for _ in range(carried)]
    work_buffer = scratch(batch + w_hh.shape[0], width) if work is None else torch.empty(work)
    arrays = (*inputs, _weight(w_hh), *outputs, *buffers, work_buffer)
    return Window(name, shape, units, worker, workers, flags, arrays)


def gru_forward(tokens, h0, emb, b_hh, w_hh, hs, rz, n, hn, units, worker, workers, flags) -> Window:
    """One worker's forward window over hidden units `units` (see kernels.c: rnnlm_gru_forward)."""
    inputs, outputs = (tokens, h0, emb, b_hh), (hs, rz, n, hn)
    return _forward_window("rnnlm_gru_forward", 3, w_hh, inputs, outputs, units, worker, workers, flags)


def gru_backward(h0, hs, rz, n, hn, grad_out, w_hh, grad_gates, grad_pre_n, grad_h0, *worker) -> Window:
    """One worker's backward window; `worker` is (units, worker, workers, flags) (see kernels.c:
    rnnlm_gru_backward); carries dh."""
    inputs, outputs = (h0, hs, rz, n, hn, grad_out), (grad_gates, grad_pre_n, grad_h0)
    return _backward_window("rnnlm_gru_backward", w_hh, inputs, outputs, 1, *worker)


def lstm_forward(tokens, h0, c0, emb, w_hh, hs, cs, gates, tcs, units, worker, workers, flags) -> Window:
    """One worker's forward window over hidden units `units` (see kernels.c: rnnlm_lstm_forward)."""
    inputs, outputs = (tokens, h0, c0, emb), (hs, cs, gates, tcs)
    return _forward_window("rnnlm_lstm_forward", 4, w_hh, inputs, outputs, units, worker, workers, flags)


def lstm_backward(
    c0, cs, gates, tcs, grad_out, grad_c_last, w_hh, grad_gates, grad_h0, grad_c0, exchange, units, *worker
) -> Window:
    """One worker's backward window; `worker` is (worker, workers, flags) (see kernels.c: rnnlm_lstm_backward);
    carries dh and dc. With an `exchange` (`lstm_exchange`, the same for every worker; None: none) each step's
    product is a sum of two parts, a worker's each, handed over there."""
    batch, hidden = c0.shape
    work = library().rnnlm_lstm_backward_scratch(batch, hidden, *units, *worker[:2], int(exchange is not None))
    inputs, outputs = (c0, cs, gates, tcs, grad_out, grad_c_last), (grad_gates, grad_h0, grad_c0, exchange)
    return _backward_window("rnnlm_lstm_backward", w_hh, inputs, outputs, 2, units, *worker, work=work)


def lstm_exchange(batch: int, hidden: int) -> torch.Tensor:
    """Where the workers of an LSTM backward window hand each other their parts of a step's product (see kernels.c:
    lstm_backward): two steps' worth, one block of batch x H (padded to whole panels) for each of the two parts."""
    return torch.empty(2 * 2 * batch * _padded(hidden))


def lstm_forward_bf16(tokens, h0, c0, emb, whh16, wout, b_out, hs16, hs, cs, gates, tcs, logits, rows) -> None:
    """The bf16 forward window with the output layer, over batch rows `rows` (see kernels.c:
    rnnlm_lstm_forward_bf16)."""
    (steps, batch, hidden), vocab, m = hs.shape, logits.shape[1], rows[1] - rows[0]
    arrays = (tokens, h0, c0, emb, whh16, wout, b_out, hs16, hs, cs, gates, tcs, logits)
    work = (scratch(m, 4 * hidden), scratch(m, vocab))
    library().rnnlm_lstm_forward_bf16(steps, batch, hidden, vocab, *rows, *map(_ptr, (*arrays, *work)))


def lstm_backward_bf16(
    tokens, c0, cs, gates, tcs, dlogits, wout, dh_last, dc_last, whh16, gpanels, by_token, grad_h0, grad_c0, rows
) -> None:
    """The bf16 backward window over batch rows `rows`, from the logits' gradient and the last step's dh, dc (see
    kernels.c: rnnlm_lstm_backward_bf16); by_token is this worker's own (vocab, 4H) buffer of zeros."""
    (steps, batch, hidden), vocab, m = cs.shape, dlogits.shape[1], rows[1] - rows[0]
    arrays = (tokens, c0, cs, gates, tcs, dlogits, wout, dh_last, dc_last, whh16, gpanels, by_token)
    dh, dc, pair = torch.empty(m * hidden), torch.empty(m * hidden), torch.empty(8 * hidden)
    g16, work, go = torch.empty(m * 4 * hidden, dtype=torch.bfloat16), scratch(m, hidden), scratch(m, hidden)
    arrays = (*arrays, grad_h0, grad_c0, dh, dc, pair, g16, work, go)
    library().rnnlm_lstm_backward_bf16(steps, batch, hidden, vocab, *rows, *map(_ptr, arrays))


def pair_panels(rows: int, columns: int) -> torch.Tensor:
    """A buffer for a weight gradient's bf16 operand of `rows` sequence rows (see kernels.c: put_pair_row)."""
    return torch.empty(_padded(columns) * 2 * ((rows + 1) // 2), dtype=torch.bfloat16)


def weight_grad_bf16(first, rest, grad_panels, out, rows: tuple[int, int]) -> None:
    """Rows `rows` of x.T @ grad into out (K, padded(G)), from bf16 products summed in float32: x is `first` then
    `rest` stacked (N, K), grad given as `pair_panels` (see kernels.c: rnnlm_weight_grad_bf16)."""
    n_first, k = first.shape
    n = n_first + rest.shape[0]
    (k0, k1), g = rows, out.shape[1]
    a_buf = torch.empty((k1 - k0) * ((n + 1) // 2), dtype=torch.int32)
    arrays = (first, rest, grad_panels, out, a_buf)
    library().rnnlm_weight_grad_bf16(n, k, g, k0, k1, n_first, *map(_ptr, arrays))


def output_step(hs, wout, b_out, wout_back, targets, logits, loss, grad_b, grad_w, grad_h, rows) -> None:
    """The output layer's training step over rows `rows` of the window's (steps * batch) rows (see kernels.c:
    rnnlm_output_step): the logits (rows of `padded(V)` floats), the summed cross-entropy into loss[0], the logits'
    gradient in their place, this worker's bias and weight gradients (grad_b (V), grad_w (V, H), zeros at the start)
    and grad_h, the gradient reaching hs (rows, H); with grad_w and grad_h None, the loss only."""
    hidden, vocab = hs.shape[-1], grad_b.shape[0]
    scale = 1.0 / targets.numel()
    work = scratch(rows[1] - rows[0], hidden) if grad_w is not None else None
    head = (*rows, hidden, vocab, *map(_ptr, (hs, wout, b_out, wout_back, targets)), scale)
    library().rnnlm_output_step(*head, *map(_ptr, (logits, loss, grad_b, grad_w, grad_h, work)))


def rows_loss(logits, targets, scale: float, loss, grad_b, rows) -> None:
    """The cross-entropy of `logits` rows `rows` (2-D, its rows may be padded), each replaced by its gradient times
    `scale`; loss[0] += their summed loss, grad_b += their gradients' sum (see kernels.c: rnnlm_rows_loss)."""
    library().rnnlm_rows_loss(*rows, *_logit_rows(logits, targets, scale, grad_b.shape[0]), _ptr(loss), _ptr(grad_b))


def rows_loss_halves(logits, targets, scale: float, loss, grad_b, team: bool) -> None:
    """`rows_loss` over all rows of `logits` in two halves, half h's into loss[8 h] and grad_b[h] (2 x V): on torch's
    two OpenMP threads with `team` (see `team`), else in turn; the same sums either way."""
    _require(grad_b.shape[0] == 2 and loss.numel() >= 16, lambda: "rows_loss_halves takes two halves' sums")
    rows = _logit_rows(logits, targets, scale, grad_b.shape[1])
    library().rnnlm_rows_loss_halves(logits.shape[0], *rows, _ptr(loss), _ptr(grad_b), int(team))


def _logit_rows(logits, targets, scale: float, vocab: int) -> tuple:
    """The arguments the loss kernels take for rows of logits after their row range: (V, row stride, targets,
    logits, scale), the rows checked to be of unit stride."""
    _require(logits.stride(1) == 1, lambda: f"rows_loss takes rows of unit stride, got {_described(logits)}")
    return vocab, logits.stride(0), _ptr(targets), logits.data_ptr(), scale


def padded(n: int) -> int:
    """n columns rounded up to whole panels: the row length of the kernels' padded buffers."""
    return _padded(n)


def clip_sgd(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float, max_norm: float) -> float:
    """torch's clip_grad_norm_ then plain SGD, in one call over every parameter (see kernels.c: rnnlm_clip_sgd);
    the parameters change in place; returns the gradients' global norm before clipping."""
    _require(
        all(p.shape == g.shape and p.dtype == g.dtype == torch.float32 for p, g in zip(params, grads, strict=True)),
        lambda: "clip_sgd takes float32 parameters and gradients of the same shapes",
    )
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    pointers = (_c_array(ctypes.c_void_p, map(_ptr, params)), _c_array(ctypes.c_void_p, map(_ptr, grads)), _ptr(sizes))
    return library().rnnlm_clip_sgd(len(params), *pointers, lr, max_norm)


def _c_array(ctype, values) -> ctypes.c_void_p:
    """`values` as a C array of `ctype`, passed by its address (the array lives as long as the address does)."""
    values = list(values)
    return ctypes.cast((ctype * len(values))(*values), ctypes.c_void_p)


def sum_squares(tensors: list[torch.Tensor], threads: int) -> float:
    """The sum of the squares of every element of float32 CPU `tensors` (a gradients' global norm squared), added
    in double on `threads` OpenMP threads, the same bits on any number (see kernels.c: rnnlm_sum_squares)."""
    _require(all(t.dtype == torch.float32 for t in tensors), lambda: "sum_squares takes float32 tensors")
    _require(threads >= 1, lambda: f"sum_squares runs on 1 thread or more, not {threads}")
    chunk, numels = library().rnnlm_squares_chunk(), [t.numel() for t in tensors]
    partial = _c_array(ctypes.c_double, [0.0] * sum(-(-size // chunk) for size in numels))  # a sum for each chunk
    arrays = (_c_array(ctypes.c_void_p, map(_ptr, tensors)), _c_array(ctypes.c_int64, numels), partial)
    return library().rnnlm_sum_squares(len(tensors), *arrays, threads)


def barrier(flags: torch.Tensor, worker: int, workers: int, step: int) -> bool:
    """Publish that worker number `worker` finished `step` and wait for the others to (see kernels.c: barrier); True
    when a worker failed instead."""
    return bool(library().rnnlm_barrier(_ptr(flags), worker, workers, step))


class _Step(ctypes.Structure):
    """A kernels.c struct of one whole SGD step, as the threads that run it share it: `of` makes one from the tensors
    behind its pointers, `worker` one thread's call of it. Subclasses name the struct's fields and its C functions."""

    function, work_floats = "", ""  # the step's C function, and the one that sizes a worker's work array

    @classmethod
    def of(cls, arrays: dict[str, torch.Tensor], lr: float, max_norm: float) -> _Step:
        """The step over `arrays` (a tensor for each pointer, by name; hs gives steps, batch and H, b_out V)."""
        (steps, batch, hidden), vocab = arrays["hs"].shape, arrays["b_out"].shape[0]
        step = cls(steps, batch, hidden, vocab, lr, max_norm, *(_ptr(arrays[name]) for name, _ in cls._fields_[6:]))
        step.arrays = arrays  # the tensors must outlive the calls: the pointers are all C sees
        return step

    def worker(self, worker: int, workers: int, flags: torch.Tensor | None) -> Call:
        """The call of the step for worker number `worker`, every argument converted now (see `Window`)."""
        lib = library()
        work = torch.empty(getattr(lib, self.work_floats)(*self._work_sizes(), worker, workers))
        pointers = (ctypes.addressof(self), worker, workers, None if flags is None else _ptr(flags), _ptr(work))
        fn = getattr(lib, self.function)

        def call(keep_alive=(self, work, flags)) -> None:
            fn(*pointers)

        return call

    def _work_sizes(self) -> tuple[int, ...]:
        return self.steps, self.batch, self.H, self.V


# kernels.c's STEP_HEAD: the fields every whole-step struct starts with
_STEP_HEAD = [(name, ctypes.c_int) for name in ("steps", "batch", "H", "V")]
_STEP_HEAD += [(name, ctypes.c_float) for name in ("lr", "max_norm")]
_STEP_HEAD += [
    (name, ctypes.c_void_p)
    for name in ("tokens", "targets", "h0", "c0", "zeros", "w_ih", "w_hh", "b_ih", "b_hh", "w_out", "b_out")
]


class LSTMSGDStep(_Step):
    """kernels.c's struct lstm_sgd_step: one SGD step of the bf16 LSTM (rnnlm_lstm_sgd_bf16)."""

    function, work_floats = "rnnlm_lstm_sgd_bf16", "rnnlm_lstm_sgd_work"
    _fields_ = _STEP_HEAD + [
        (name, ctypes.c_void_p)
        for name in (
            "emb", "whh_fwd", "whh_back", "wout_fwd", "wout_back", "hs16", "hs", "cs", "gates", "tcs", "logits",
            "gpanels", "grad_h0", "grad_c0", "grad_w_hh_t", "loss", "token_grad", "grad_b", "grad_w_out", "grad_b_out",
        )
    ]  # fmt: skip


class Float32Step(_Step):
    """kernels.c's struct f32_step: one SGD step of a float32 one-layer model, its kind's `function` (None for the
    pointers it does not use)."""

    gate_blocks = 0  # of the kind's weights, as rnnlm_sgd_f32_work takes them (not `gates`: a field's name)
    work_floats = "rnnlm_sgd_f32_work"
    _fields_ = _STEP_HEAD + [
        (name, ctypes.c_void_p)
        for name in (
            "emb", "wout_fwd", "wout_back", "whh_fwd", "whh_back", "hs", "cs", "gates", "tcs", "logits", "grad_h",
            "grad_gates", "hprev", "grad_w_hh", "loss", "token_grad", "grad_b", "grad_w_out", "grad_b_out",
        )
    ]  # fmt: skip

    def _work_sizes(self) -> tuple[int, ...]:
        return self.steps, self.batch, self.H, self.gate_blocks


class LSTMFloat32Step(Float32Step):
    """The float32 LSTM's (rnnlm_lstm_sgd_f32; whh_fwd, whh_back unused)."""

    function, gate_blocks = "rnnlm_lstm_sgd_f32", 4


class RNNFloat32Step(Float32Step):
    """The float32 tanh RNN's (rnnlm_rnn_sgd_f32; c0, zeros, cs, gates, tcs unused)."""

    function, gate_blocks = "rnnlm_rnn_sgd_f32", 1
