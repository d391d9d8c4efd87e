"""Where a step's time goes, operator by operator, without moving the heap it measures.

``torch.profiler`` records an event (and with ``record_shapes`` its inputs' shapes) for every
operator, and its growing event buffers share the heap with the step: in a process that keeps
freed memory (``clipalign.memory.keep_freed_memory``, what ``clipalign train`` does) the step's
large blocks no longer fit where they fitted, and are faulted in again. Measured on a ``ca-small``
bf16 step (AMD EPYC, one thread): a plain step takes no page faults and ~2 s of CPU; profiled,
it takes 4-95 k faults and 0.3-2.3 s of system time, charged to whichever operator first
writes the fresh pages (``gelu_backward``: 300-760 ms a step under the profiler, 52 ms without).

``OpTimer`` is a dispatch mode that times every ATen operator the step runs (forward, the
autograd engine's backward kernels and the optimizer's, each after autograd, so composite
operators are counted once, as the kernels they run) and allocates nothing per call but two
counter updates.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm"})  # the operators that run on the matrix units


class OpTimer(TorchDispatchMode):
    """Self time and calls of every ATen operator run under it, by operator name (``mm``, ``gelu``).

    ``with OpTimer() as timer: step()`` then ``timer.seconds["mm"]``; ``clock`` is
    ``time.perf_counter`` (wall) or ``time.process_time`` (one thread's CPU time).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.clock = clock
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        start = self.clock()
        out = func(*args, **(kwargs or {}))  # the mode is off inside: nested operators are not re-counted
        name = func.overloadpacket.__name__
        self.seconds[name] += self.clock() - start
        self.calls[name] += 1
        return out

    def matmul_seconds(self) -> float:
        """Seconds spent in the matrix-unit operators (``MATMUL_OPS``)."""
        return sum(s for name, s in self.seconds.items() if name in MATMUL_OPS)

    def table(self, total: float, rows: int = 25) -> str:
        """The ``rows`` slowest operators: ms, share of ``total`` seconds, calls."""
        lines = [f"{'operator':<36} {'ms':>9} {'share':>7} {'calls':>6}"]
        for name, seconds in self.seconds.most_common(rows):
            lines.append(f"{name:<36} {1000 * seconds:9.1f} {100 * seconds / total:6.1f}% {self.calls[name]:6d}")
        return "\n".join(lines)
