"""Numeric precision and attention-kernel contexts shared by training and inference."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")


def attention_backend(kind: str) -> contextlib.AbstractContextManager:
    """``math`` forces PyTorch's plain attention kernels: on CPUs the fused (flash) backward
    is slow in bf16, and the math path made a ViT's step 1.35x faster here (BENCHMARKS.md)."""
    if kind == "math":
        return sdpa_kernel(SDPBackend.MATH)
    if kind == "auto":
        return contextlib.nullcontext()
    raise ValueError(f"unknown attention backend {kind!r} (math or auto)")
