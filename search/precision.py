"""train.precision: what a run computes in, decided once per machine from a measurement, never assumed.

On CPU the same fp32 maths has two matmul routes: torch's default GEMM, and oneDNN's (taken when
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`). Which is faster, and whether oneDNN then really computes
in fp32, depends on the CPU: on AMD AVX-512 parts it is fp32 and 1.1x (Zen 4) to 1.8x faster; on Intel parts with
AMX it computes in bf16. bf16 autocast is ~2-3x faster where bf16 is native and ~50x slower where it is not. So
`auto` times a small training block at the model's shapes through each route, measures each matmul's error against
float64, and takes oneDNN's where its error is fp32-level and it is >= 1.25x faster; bf16 only where it is >= 1.5x
faster than that fp32 route (its steps are not even timed where its matmuls are far slower). The result is cached
per machine, torch version, threads and shape, so only a machine's first run pays the probe (about a second). On
CUDA, `auto` keeps the old behaviour: autocast (bf16 where the GPU has it, else fp16) unless train.amp = false.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from search.config import RunConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FP32_LEVEL = 1e-5  # relative error vs float64 an "fp32" route may have (fp32 GEMM ~3e-7 at K=512, bf16 ~3e-3)
BF16_MIN_SPEEDUP = 1.5  # auto takes bf16 on CPU only when a training block is this much faster than fp32
# oneDNN's fp32 route only when this much faster than the default: a 0.2 s probe is +-15% (on an AVX2 EPYC it saw
# oneDNN >= 1.1x at d64 and d80 where 3 x 3 s said 0.92x-1.02x); where oneDNN pays (AMD AVX-512) it is 1.4x-1.8x
ONEDNN_MIN_SPEEDUP = 1.25
# bf16 training steps are timed only where a bf16 matmul at the model's shapes is at least this fraction of fp32's:
# without native bf16 it is ~50x slower, a d512 step then takes seconds and could never reach BF16_MIN_SPEEDUP
BF16_MATMUL_FLOOR = 0.5
PREDICT_MIN_SPEEDUP_PER_THREAD = 0.75  # predict uses all cores only when they pay: else one thread is cheaper
PROBE_SECONDS = 0.2  # CPU-seconds timed per route (at least 3 steps, after a warm-up step)
CACHE_ENV = "HW4_CACHE_DIR"
ROUTES = ("default", "onednn")  # how fp32 matmuls run on CPU


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the dtype autocast computes in (None: fp32) and the CPU's fp32 matmul route."""

    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16"
    route: str = "default"  # "default" | "onednn"

    @property
    def label(self) -> str:
        """What a user reads in status and reports: "bf16", "fp32", "fp32 (oneDNN)", "bf16 (oneDNN)"."""
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
    steps_per_cpu_s: float  # training steps of the model (forward, backward, AdamW) per CPU-second
    rel_error: float  # error of a matmul at the model's shapes vs float64, relative (Frobenius)
    timed: bool = True  # False: not timed (bf16 matmuls below BF16_MATMUL_FLOOR): steps estimated from the matmuls


@dataclass(frozen=True)
class ProbeResult:
    key: str  # the model's shape (probe_key)
    threads: int
    timings: tuple[RouteTiming, ...]
    seconds: float  # wall time the probe took
    predict_threads: int = 1

    def timing(self, route: str) -> RouteTiming:
        return next(t for t in self.timings if t.route == route)

    @property
    def fp32_route(self) -> str:
        """oneDNN where its error is fp32-level and it is clearly faster (ONEDNN_MIN_SPEEDUP), else the default."""
        onednn, default = self.timing("onednn"), self.timing("default")
        fast = onednn.steps_per_cpu_s >= ONEDNN_MIN_SPEEDUP * default.steps_per_cpu_s
        return "onednn" if onednn.rel_error <= FP32_LEVEL and fast else "default"

    @property
    def bf16_speedup(self) -> float:
        """bf16 autocast's steps per CPU-second over the chosen fp32 route's."""
        return self.timing("bf16").steps_per_cpu_s / self.timing(self.fp32_route).steps_per_cpu_s

    def decision(self) -> Precision:
        dtype = "bf16" if self.bf16_speedup >= BF16_MIN_SPEEDUP else "fp32"
        return Precision(dtype, self.fp32_route)


SHAPE_KEYS = ("encoder", "d_model", "nhead", "n_layers", "ff_mult", "subsample", "prenet", "conv_kernel",
              "conv_expansion")  # what sets a step's cost; pooling, head and loss matter little and vary per trial


def probe_key(cfg: RunConfig, n_mels: int, n_classes: int) -> str:
    m, t = cfg.model, cfg.train
    used = [k for k in SHAPE_KEYS if k not in m.unused_keys()]
    return ",".join([*(f"{k}={getattr(m, k)}" for k in used), f"batch={t.batch_size}", f"seg={t.segment_len}",
                     f"mels={n_mels}", f"classes={n_classes}"])


def resolve(cfg: RunConfig, device: torch.device, n_mels: int, n_classes: int) -> Precision:
    """cfg's train.precision (and the older train.amp) -> what a run of it computes in on `device`. An explicit
    fp32 on CPU still takes the measured fp32 route (fp32_route)."""
    precision, amp = cfg.train.precision, cfg.train.amp  # validated by TrainConfig
    if device.type == "cuda":
        if precision == "auto":
            if not amp:
                return Precision("fp32")
            return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        return Precision(precision)
    if precision in ("bf16", "fp16"):
        return Precision(precision)
    result = probe(cfg, n_mels, n_classes)
    if precision == "fp32" or not amp:
        return Precision("fp32", result.fp32_route)
    return result.decision()


def probe(cfg: RunConfig, n_mels: int, n_classes: int, threads: int | None = None, cache: bool = True
          ) -> ProbeResult:
    """The timings of cfg's model with `threads` (this process's): from the per-machine cache, or measured."""
    threads = threads or torch.get_num_threads()
    key = probe_key(cfg, n_mels, n_classes)
    entry = f"{_machine()}|t{threads}|{key}"
    path = cache_path()
    if cache:
        found = _read_cache(path).get(entry)
        if found is not None:
            with contextlib.suppress(TypeError, KeyError, ValueError):
                return _from_json(found)
    result = measure(cfg, n_mels, n_classes, threads)
    if cache:
        _write_cache(path, entry, result)
    return result


def measure(cfg: RunConfig, n_mels: int, n_classes: int, threads: int) -> ProbeResult:
    """Time training steps of cfg's model on random data through each route (CPU-seconds, `threads` threads),
    one thread vs `threads` for predict, and a matmul at its shapes against float64. The caller's random state
    and thread count are left as they were."""
    start, before = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # predict calls it under no_grad
            return _measure(cfg, n_mels, n_classes, threads, start)
    finally:
        torch.set_num_threads(before)


def _measure(cfg: RunConfig, n_mels: int, n_classes: int, threads: int, start: float) -> ProbeResult:
    from models import build_model

    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = build_model(m, n_mels, n_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randn(t.batch_size, t.segment_len, n_mels)
    lengths = torch.full((t.batch_size,), t.segment_len)
    y = torch.randint(0, n_classes, (t.batch_size,))
    k, n = m.d_model, m.dim_feedforward
    a, w = torch.randn(min(256, t.batch_size * t.segment_len), k), torch.randn(n, k) / k**0.5
    reference = a.double() @ w.double().T
    steps, errors, matmuls = {}, {}, {}
    for route in (*ROUTES, "bf16"):
        precision = Precision("bf16", "default") if route == "bf16" else Precision("fp32", route)
        with precision.applied(), torch.no_grad(), precision.autocast(torch.device("cpu")):
            got = F.linear(a, w).double()  # also the warm-up of the timed matmul
            matmuls[route] = _matmul_cost(lambda: F.linear(a, w))
        errors[route] = float((got - reference).norm() / reference.norm())
        if route == "bf16" and matmuls["default"] < BF16_MATMUL_FLOOR * matmuls["bf16"]:
            continue
        step = training_step(model, optimizer, x, lengths, y, precision)
        step()  # warm-up: oneDNN builds its kernels on the first call
        steps[route] = step
    costs = _interleaved_costs(steps)
    timings = [RouteTiming(route, 1.0 / costs[route], errors[route]) for route in steps]
    if "bf16" not in steps:
        estimate = matmuls["default"] / matmuls["bf16"] / costs["default"]
        timings.append(RouteTiming("bf16", estimate, errors["bf16"], timed=False))
    model.eval()
    with torch.no_grad():
        predict_threads = _predict_threads(lambda: model(x, lengths), threads)
    return ProbeResult(probe_key(cfg, n_mels, n_classes), threads, tuple(timings), time.perf_counter() - start,
                       predict_threads)


def training_step(model, optimizer, x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor, precision: Precision):
    """One CPU training step of `model` on a fixed batch as train() computes it in `precision` (for timing)."""

    def step() -> None:
        with precision.applied():
            with precision.autocast(torch.device("cpu")):
                logits = model(x, lengths)
            loss = model.criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def _matmul_cost(matmul) -> float:
    """CPU-seconds per call (the caller has warmed it up): the lesser of two rounds of >= 2 ms each."""
    costs = []
    for _ in range(2):
        calls, start = 0, time.process_time()
        while (spent := time.process_time() - start) < 2e-3 or calls == 0:
            matmul()
            calls += 1
        costs.append(spent / calls)
    return max(min(costs), 1e-9)


def _interleaved_costs(calls: dict) -> dict[str, float]:
    """CPU-seconds per call of each function: rounds of one call each, median per function, so a slow spell of a
    shared machine hits them alike; PROBE_SECONDS per function in all, and at least 3 rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    while spent < PROBE_SECONDS * len(calls) or len(times[next(iter(calls))]) < 3:
        for name, fn in calls.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
            spent += times[name][-1]
    return {name: max(statistics.median(t), 1e-9) for name, t in times.items()}


def _predict_threads(forward, threads: int) -> int:
    """All `threads` for predict only when their wall-clock speed-up pays for the extra CPU-seconds."""
    if threads <= 1:
        return 1
    speeds = {}
    for count in (1, threads):
        torch.set_num_threads(count)
        forward()
        calls, start = 0, time.perf_counter()
        while (spent := time.perf_counter() - start) < PROBE_SECONDS / 2 or calls < 2:
            forward()
            calls += 1
        speeds[count] = calls / spent
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
    return ProbeResult(str(values["key"]), int(values["threads"]),
                       tuple(RouteTiming(**t) for t in values["timings"]), float(values["seconds"]),
                       int(values.get("predict_threads", 1)))
