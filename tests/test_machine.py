"""The machine description benchmarks print: the CPU kind follows its flags."""
from __future__ import annotations

from clipalign.machine import MATRIX_FLAGS, cpu_kind, describe, summary_line


def test_cpu_kind_follows_the_matrix_flags():
    assert cpu_kind({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "amx"
    assert cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert cpu_kind({"avx2", "fma"}) == "avx2"


def test_describe_reports_this_machines_flags_and_kind():
    info = describe()
    assert set(info["flags"]) <= set(MATRIX_FLAGS)
    assert info["kind"] == cpu_kind(set(info["flags"]))
    line = summary_line(info)
    assert info["cpu"] in line and info["kind"] in line and info["torch"] in line


def test_matmul_ceiling_is_the_flops_of_one_matmul_over_its_median_time(monkeypatch):
    import itertools

    import torch

    from clipalign import machine

    ticks = itertools.accumulate(itertools.cycle([0.0, 0.5, 0.0, 0.25, 0.0, 4.0]))  # matmuls of 0.5, 0.25, 4 s
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
    n = 32
    assert machine.matmul_ceiling(torch.float32, n=n, repeats=3) == 2 * n**3 / 0.5
