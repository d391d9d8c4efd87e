"""clipalign.op_timer: every operator a step runs is counted once, with the time its call took."""
from __future__ import annotations

import itertools

import torch

from clipalign.op_timer import OpTimer


def test_times_each_aten_call_once_and_leaves_results_alone():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    linear = torch.nn.Linear(8, 3)
    expected = torch.nn.functional.gelu(linear(x)).sum()
    expected.backward()
    grad = x.grad.clone()
    x.grad = None

    ticks = itertools.count()  # a clock that advances by one at every reading: each call takes exactly 1 s
    with OpTimer(clock=lambda: float(next(ticks))) as timer:
        out = torch.nn.functional.gelu(linear(x)).sum()
        out.backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, grad)
    assert timer.seconds == timer.calls  # one reading before and one after each call, none nested
    assert timer.calls["addmm"] == 1 and timer.calls["gelu"] == 1 and timer.calls["gelu_backward"] == 1
    assert timer.calls["mm"] >= 2  # the backward's input and weight gradients
    assert timer.matmul_seconds() == timer.calls["addmm"] + timer.calls["mm"]


def test_table_lists_the_slowest_operators_first():
    timer = OpTimer()
    timer.seconds.update({"mm": 0.75, "gelu": 0.25})
    timer.calls.update({"mm": 3, "gelu": 1})
    header, first, second = timer.table(total=1.0).splitlines()
    assert first.split() == ["mm", "750.0", "75.0%", "3"] and second.split()[0] == "gelu"
