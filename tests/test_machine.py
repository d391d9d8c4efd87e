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
