"""Numeric precision and attention-kernel contexts shared by training and inference."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("fp32", "bf16")


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 math runs natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX.

    Elsewhere oneDNN emulates it, far slower than fp32: on an AVX2-only EPYC a bf16 matmul ran
    at 0.8 GFLOP/s against fp32's 47, and the demo's training step took 28 s instead of ~1.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # the check torch's own code uses
    return bool(check is not None and check())


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """``auto`` becomes ``bf16`` where it runs natively (see ``native_bf16``), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (auto, fp32 or bf16)")
    return precision


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
