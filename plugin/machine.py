"""What the machine at hand computes fast: its dense matmul rate per dtype, and the heal's precision.

``matmul_rate`` is the one measurement: the heal's ``dtype: auto`` and ``bench/heal_throughput.py``
both use it. On CPUs the flags do not tell: an AMD EPYC with bf16 ran bf16 matmuls at 4x its fp32
rate, an Intel Xeon that also reports ``avx512_bf16`` at 0.6x. So ``dtype: auto`` times a few
matmuls of the heal's own shapes in each dtype (about a second) and keeps the faster.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

MatmulShape = tuple[int, int, int]  # (m, k, n): [m, k] @ [k, n]
CANDIDATES = ("bfloat16", "float32")  # the precisions dtype: auto chooses between
# bf16 autocast also casts weights and runs its elementwise work in fp32: it must beat fp32 matmuls
# by this factor to be chosen
BF16_MARGIN = 1.15
SHAPE_GFLOP = 1.0  # rows of a measured shape are capped so that one matmul is about this much work


def matmul_flops(shape: MatmulShape) -> int:
    m, k, n = shape
    return 2 * m * k * n


def matmul_rate(dtype: torch.dtype, shapes: Sequence[MatmulShape], device: str = "cpu",
                seconds: float = 0.75) -> float:
    """The dense matmul rate in GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` for each of ``shapes``.

    Each shape gets an equal share of ``seconds``. Its rows grow from 1 (x4) up to ``m`` while a
    run stays under a quarter of the share, so a dtype the machine runs hundreds of times slower
    (bf16 on a CPU without it) is measured on fewer rows instead of for minutes; then it repeats
    until half its share is used and its fastest run counts. Shapes are taken smallest first and
    the rest skipped after ``2 x seconds``. The rate is the work over the sum of the fastest times.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)

    def operand(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)

    share = seconds / max(1, len(shapes))
    deadline = time.perf_counter() + 2 * seconds
    work = fastest = 0.0
    for m, k, n in sorted(shapes, key=lambda shape: shape[1] * shape[2]):
        if work and time.perf_counter() > deadline:
            break
        b, rows = operand(k, n), 1
        while True:
            a = operand(rows, k)
            times = [_timed_matmul(a, b)]
            if rows >= m or times[0] > share / 4:
                break
            rows = min(m, rows * 4)
        while sum(times) < share / 2:
            times.append(_timed_matmul(a, b))
        work += matmul_flops((rows, k, n))
        fastest += min(times)
    return work / fastest / 1e9


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    torch.mm(a, b)
    sync()
    return time.perf_counter() - started


def heal_shapes(tokens: int, hidden: int, intermediate: int, vocab: int) -> list[MatmulShape]:
    """The heal's main matmuls for a micro-batch of ``tokens``: MLP up and down, a weight gradient,
    the LM head; rows capped so that each is about ``SHAPE_GFLOP`` of work."""
    shapes = [(tokens, hidden, intermediate), (tokens, intermediate, hidden), (intermediate, tokens, hidden),
              (tokens, hidden, vocab)]
    return [_capped(shape) for shape in shapes]


def _capped(shape: MatmulShape) -> MatmulShape:
    m, k, n = shape
    rows = max(16, int(SHAPE_GFLOP * 1e9 / (2 * k * n)))
    return (min(m, rows), k, n)


# ---------------------------------------------------------------- the heal's precision
@dataclass(frozen=True)
class DtypeChoice:
    """The heal's compute precision and why: ``dtype`` is the autocast dtype, None for plain fp32."""

    name: str  # "bfloat16" or "float32"
    reason: str
    rates: dict[str, float] | None = None  # measured GFLOP/s per candidate (dtype: auto on a CPU)

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bfloat16" else None

    def record(self) -> dict[str, Any]:
        return asdict(self)


def faster_dtype(rates: dict[str, float]) -> str:
    """The candidate to train in given measured rates: bf16 only when it beats fp32 by ``BF16_MARGIN``."""
    if rates["bfloat16"] >= BF16_MARGIN * rates["float32"]:
        return "bfloat16"
    return "float32"


Measure = Callable[[torch.dtype, Sequence[MatmulShape]], float]


def choose_dtype(device: str, setting: str, shapes: Sequence[MatmulShape],
                 measure: Measure | None = None) -> DtypeChoice:
    """The heal precision for ``heal.dtype`` (auto, float32, bfloat16) on ``device``.

    auto: bf16 on a CUDA GPU that supports it; on a CPU, the faster of bf16 and fp32 by
    ``measure`` (default ``matmul_rate`` on this CPU, measured once per process and shapes);
    fp32 elsewhere.
    """
    if setting in CANDIDATES:
        return DtypeChoice(setting, "set by heal.dtype")
    kind = device.split(":")[0]
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "CUDA GPU with bf16")
        return DtypeChoice("float32", "CUDA GPU without bf16")
    if kind != "cpu":
        return DtypeChoice("float32", f"{kind} device")
    rates = dict(measure_rates(tuple(shapes))) if measure is None else \
        {name: measure(getattr(torch, name), shapes) for name in CANDIDATES}
    name = faster_dtype(rates)
    return DtypeChoice(name, "faster matmuls measured on this CPU", {k: float(f"{v:.3g}") for k, v in rates.items()})


@functools.lru_cache(maxsize=None)
def measure_rates(shapes: tuple[MatmulShape, ...]) -> tuple[tuple[str, float], ...]:
    """``matmul_rate`` on this CPU for each candidate dtype, once per process and shapes."""
    return tuple((name, matmul_rate(getattr(torch, name), shapes)) for name in CANDIDATES)


# ---------------------------------------------------------------- threads
def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads not counted)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def use_physical_cores() -> int:
    """Run torch's CPU kernels on one thread per physical core, unless OMP_NUM_THREADS says
    otherwise; return the thread count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(physical_cores())
    return torch.get_num_threads()
