"""Numeric precision and attention-kernel contexts shared by training and inference."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device_type`` ("cpu" or "cuda"), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (inputs go there); the CPU for one without any."""
    return next(model.parameters(), torch.empty(0)).device
