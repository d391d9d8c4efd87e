"""What machine this is: the CPU, its matrix-unit features and torch's view of it.

Every benchmark prints it beside its numbers (the project's machines change from day to day),
and ``describe`` is the one place that reads ``/proc/cpuinfo``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# the flags that decide how fast bf16 runs: AMX tiles (Sapphire Rapids on), AVX-512 BF16 (Zen 4/5,
# Cooper Lake on), else AVX2 only, where oneDNN emulates bf16
MATRIX_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown", set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
    return model, flags


def cpu_kind(flags: set[str] | None = None) -> str:
    """``amx``, ``avx512_bf16`` or ``avx2`` (bf16 emulated): the kind BENCHMARKS.md tables are per."""
    flags = _cpuinfo()[1] if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx2"


def describe() -> dict[str, Any]:
    """The CPU model, its kind and matrix flags, cores, load, and Python / torch versions."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "kind": cpu_kind(flags),
        "flags": [f for f in MATRIX_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def summary_line(info: dict[str, Any] | None = None) -> str:
    """One line for a benchmark's output: ``Intel Xeon ... (amx: amx_bf16 ...), 2 cores, torch 2.14.1``."""
    info = describe() if info is None else info
    return (f"{info['cpu']} ({info['kind']}: {' '.join(info['flags']) or 'no matrix flags'}), "
            f"{info['usable_cores']} cores, load {info['load_avg_1m']}, torch {info['torch']}, "
            f"{info['torch_threads']} threads")


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n×n matmul in ``dtype`` on torch's threads: the median of ``repeats``.

    The ceiling a benchmark quotes its MFU against, measured in the same run (a shared
    machine's speed moves from day to day, and from minute to minute).
    """
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)
