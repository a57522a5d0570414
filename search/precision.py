"""train.precision: what a run computes in, decided once per machine from a measurement, never assumed.

On CPU the same fp32 maths has two matmul routes: torch's default GEMM, and oneDNN's (taken when
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`). Which is faster, and whether oneDNN then really
computes in fp32, depends on the CPU: on AMD AVX-512 parts it is fp32 and up to 1.8x faster; on Intel parts with
AMX it computes in bf16. bf16 autocast is ~3x faster where bf16 is native and ~50x slower where it is not. So
`auto` times a small training block at the model's shapes through each route, measures each matmul's error
against float64, and takes the fastest route whose error is fp32-level; bf16 only where it is >= 1.5x faster
than that. The result is cached per machine, torch version, threads and shape, so only a machine's first run
pays the probe (a fraction of a second). On CUDA, `auto` keeps the old behaviour: autocast (bf16 where the GPU
has it, else fp16) unless train.amp = false.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FP32_LEVEL = 1e-5  # relative error vs float64 an "fp32" route may have (fp32 GEMM ~3e-7 at K=512, bf16 ~3e-3)
BF16_MIN_SPEEDUP = 1.5  # auto takes bf16 on CPU only when a training block is this much faster than fp32
PREDICT_MIN_SPEEDUP_PER_THREAD = 0.75  # predict uses all cores only when they pay: else one thread is cheaper
PROBE_SECONDS = 0.06  # CPU-seconds timed per route (after a warm-up call)
CACHE_ENV = "HW4_CACHE_DIR"
ROUTES = ("default", "onednn")  # how fp32 matmuls run on CPU


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the dtype autocast computes in (None: fp32) and the CPU's fp32 matmul route."""

    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16"
    route: str = "default"  # "default" | "onednn"

    @property
    def label(self) -> str:
        """What a user reads in status and reports: "bf16", "fp32", "fp32 (oneDNN)"."""
        return self.dtype + (" (oneDNN)" if self.route == "onednn" else "")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)

    def autocast(self, device: torch.device):
        """The context a forward pass runs in (losses and margin logits are computed in fp32 inside it)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def needs_scaler(self) -> bool:
        return self.dtype == "fp16"

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The fp32 matmul route set for the block, and put back after it (a process-wide torch flag)."""
        flags = torch.backends.mkldnn.matmul
        before = flags.fp32_precision
        flags.fp32_precision = "bf16" if self.route == "onednn" else "none"
        try:
            yield
        finally:
            flags.fp32_precision = before


@dataclass(frozen=True)
class RouteTiming:
    route: str  # "default", "onednn" or "bf16" (autocast)
    blocks_per_cpu_s: float  # training blocks (forward + backward) per CPU-second
    rel_error: float  # matmul error vs float64, relative (Frobenius)


@dataclass(frozen=True)
class ProbeResult:
    shape: tuple[int, int, int]  # (M, K, N) of the timed block
    threads: int
    timings: tuple[RouteTiming, ...]
    seconds: float  # wall time the probe took
    predict_threads: int = 1

    def timing(self, route: str) -> RouteTiming:
        return next(t for t in self.timings if t.route == route)

    @property
    def fp32_route(self) -> str:
        """The fastest route whose error is fp32-level (the default one always is)."""
        ok = [t for t in self.timings if t.route in ROUTES and t.rel_error <= FP32_LEVEL]
        return max(ok, key=lambda t: t.blocks_per_cpu_s).route if ok else "default"

    @property
    def bf16_speedup(self) -> float:
        """bf16 autocast's blocks per CPU-second over the chosen fp32 route's."""
        return self.timing("bf16").blocks_per_cpu_s / self.timing(self.fp32_route).blocks_per_cpu_s

    def decision(self) -> Precision:
        dtype = "bf16" if self.bf16_speedup >= BF16_MIN_SPEEDUP else "fp32"
        return Precision(dtype, self.fp32_route)


def probe_shape(d_model: int, ff: int, batch_size: int, segment_len: int) -> tuple[int, int, int]:
    """The (M, K, N) of a model's feed-forward matmuls, M (the frames of a batch) capped so a probe stays a
    fraction of a second."""
    k, n = max(8, d_model), max(8, ff)
    return (max(64, min(batch_size * segment_len, 2048, 2**27 // (k * n))), k, n)


def resolve(precision: str, device: torch.device, amp: bool = True, shape: tuple[int, int, int] | None = None
            ) -> Precision:
    """train.precision (and the older train.amp) -> what this run computes in on `device`. An explicit fp32 on
    CPU still takes the measured fastest fp32-level route."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            if not amp:
                return Precision("fp32")
            return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        return Precision(precision)
    if precision in ("bf16", "fp16"):
        return Precision(precision)
    result = probe(shape or probe_shape(80, 256, 32, 128))
    if precision == "fp32" or not amp:
        return Precision("fp32", result.fp32_route)
    return result.decision()


def probe(shape: tuple[int, int, int], threads: int | None = None, cache: bool = True) -> ProbeResult:
    """The timings at `shape` with this process's threads: from the per-machine cache, or measured (and cached)."""
    threads = threads or torch.get_num_threads()
    key = f"{_machine()}|t{threads}|{shape[0]}x{shape[1]}x{shape[2]}"
    path = cache_path()
    if cache:
        found = _read_cache(path).get(key)
        if found is not None:
            with contextlib.suppress(TypeError, KeyError, ValueError):
                return _from_json(found)
    result = measure(shape, threads)
    if cache:
        _write_cache(path, key, result)
    return result


def measure(shape: tuple[int, int, int], threads: int) -> ProbeResult:
    """Time a Linear-GELU-Linear block, forward and backward, at `shape` through each route (CPU-seconds, this
    process's threads), plus one thread vs `threads` for predict; each matmul's error against float64."""
    start, before = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.enable_grad():  # predict calls it under no_grad
            return _measure(shape, threads, start)
    finally:
        torch.set_num_threads(before)


def _measure(shape: tuple[int, int, int], threads: int, start: float) -> ProbeResult:
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w1 = (torch.randn(n, k, generator=gen) / k**0.5).requires_grad_()
    w2 = (torch.randn(k, n, generator=gen) / n**0.5).requires_grad_()
    reference = x.double() @ w1.detach().double().T
    timings = []
    for route in (*ROUTES, "bf16"):
        precision = Precision("bf16" if route == "bf16" else "fp32", "default" if route == "bf16" else route)
        with precision.applied():
            def block(precision: Precision = precision) -> None:
                with precision.autocast(torch.device("cpu")):
                    out = F.linear(F.gelu(F.linear(x, w1)), w2)
                out.float().sum().backward()

            with torch.no_grad(), precision.autocast(torch.device("cpu")):
                got = F.linear(x, w1).double()
            error = float((got - reference).norm() / reference.norm())
            timings.append(RouteTiming(route, 1.0 / _cpu_seconds_per_call(block), error))
    predict_threads = _predict_threads(x, w1.detach(), threads)
    return ProbeResult(shape, threads, tuple(timings), time.perf_counter() - start, predict_threads)


def _cpu_seconds_per_call(fn) -> float:
    fn()  # warm-up: oneDNN builds its kernel on the first call
    calls, start = 0, time.process_time()
    while (spent := time.process_time() - start) < PROBE_SECONDS or calls < 2:
        fn()
        calls += 1
    return max(spent, 1e-9) / calls


def _predict_threads(x: torch.Tensor, w: torch.Tensor, threads: int) -> int:
    """All `threads` for predict only when their wall-clock speed-up pays for the extra CPU-seconds."""
    if threads <= 1:
        return 1
    before = torch.get_num_threads()
    try:
        speeds = {}
        for t in (1, threads):
            torch.set_num_threads(t)
            with torch.no_grad():
                F.linear(x, w)
                calls, start = 0, time.perf_counter()
                while (spent := time.perf_counter() - start) < PROBE_SECONDS / 2 or calls < 2:
                    F.linear(x, w)
                    calls += 1
            speeds[t] = calls / spent
    finally:
        torch.set_num_threads(before)
    return threads if speeds[threads] / speeds[1] >= PREDICT_MIN_SPEEDUP_PER_THREAD * threads else 1


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "hw4-search")
    return Path(root) / "precision.json"


@functools.cache
def _machine() -> str:
    """The CPU (model name and flags), torch version and capability: a cached timing is valid only there."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags", "vendor_id"))})
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
    return f"torch{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|cpu{digest}"


def _read_cache(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _write_cache(path: Path, key: str, result: ProbeResult) -> None:
    """Merge one entry in, atomically (several workers may probe at once; a lost entry is only probed again)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {**_read_cache(path), key: asdict(result)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(values, indent=1))
        tmp.replace(path)


def _from_json(values: dict) -> ProbeResult:
    return ProbeResult(tuple(values["shape"]), int(values["threads"]),
                       tuple(RouteTiming(**t) for t in values["timings"]), float(values["seconds"]),
                       int(values.get("predict_threads", 1)))
