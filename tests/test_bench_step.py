"""scripts/bench_step.py: each row's FLOPs, MFU and matmul share come from the step it timed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_report_flops_mfu_and_the_matmul_share(bench_step, tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench_step.main(["--model", "ca-tiny", "--batch-size", "8", "--steps", "1", "--system-malloc", "--profile",
                            "--only", "MLM off, SimCLR off", "MLM on", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    off, on = result["rows"]
    printed = capsys.readouterr().out
    assert on["flops_per_step"] > off["flops_per_step"]  # the MLM pass was counted
    for row in (off, on):
        assert 0 < row["matmul_flops_per_step"] < row["flops_per_step"]  # ca-tiny's convolutions are not matmuls
        assert 0 < row["matmul_ms"] < row["profiled_ms"]
        assert row["matmul_ms"] == pytest.approx(sum(row["operators_ms"][op] for op in ("mm", "addmm", "bmm", "baddbmm")
                                                      if op in row["operators_ms"]))
        assert f"{row['profiled_minor_faults']} page faults" in printed
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / (row["ms_per_step"] / 1000) / result["ceiling_flops"])
    assert "matmul ceiling this run" in printed and f"MFU {100 * on['mfu']:4.1f} %" in printed


def test_vary_length_batches_give_the_text_another_width(bench_step):
    from types import SimpleNamespace

    from clipalign.factory import get_tokenizer
    from clipalign.model import text_length

    tokenizer = get_tokenizer("ca-tiny")
    model = SimpleNamespace(image_size=16)
    widths = {n: text_length(bench_step.make_batch(model, tokenizer, 8, False, longest=n)["text"], tokenizer.eot_token_id)
              for n in (5, 12, 20)}
    assert widths[5] < widths[12] < widths[20]  # each longest caption sets the columns the trainer keeps
    assert text_length(bench_step.make_batch(model, tokenizer, 8, False)["text"], tokenizer.eot_token_id) == widths[12] + 1
