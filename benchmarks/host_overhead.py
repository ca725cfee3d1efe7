"""Host cost of the fused ops' front doors, without a GPU: kernel launches per call and Python time per call.

On a GPU, an op whose kernels take less time than its host code (argument checks, dispatch, planning, the
launches themselves) runs at the speed of the host: the first H200 run measured the soft split's eager calls at
several times its kernels' predicted time (``benchmarks/results/nvidia-h200.md``). This script runs each front
door on small CPU tensors under the Triton interpreter with every kernel launch replaced by a counter, so what it
times is the Python that runs per call, and it counts the launches (Triton kernels; the torch ops between them
are not counted). Times are medians of rounds on this machine's CPU: compare versions on one machine, not
machines.

    python benchmarks/host_overhead.py [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from typing import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class LaunchCounter:
    """While active, every Triton kernel launch is counted (by kernel name) instead of run."""

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()

    def __enter__(self) -> "LaunchCounter":
        from triton.runtime.interpreter import InterpretedFunction

        self._cls, self._saved = InterpretedFunction, InterpretedFunction.__getitem__

        def launcher(fn, grid):
            def launch(*args, **kwargs):
                self.launches[fn.fn.__name__] += 1
            return launch

        InterpretedFunction.__getitem__ = launcher
        return self

    def __exit__(self, *exc) -> None:
        self._cls.__getitem__ = self._saved


def _soft_split_calls() -> dict[str, Callable[[], object]]:
    import t2t_fast

    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rand(2, 64, 28, 28).requires_grad_()
    w, b = rand(192, 576).requires_grad_(), rand(192).requires_grad_()
    nw, nb = rand(576).requires_grad_(), rand(576).requires_grad_()
    dy = rand(2, 196, 192)

    def fwd():
        with torch.no_grad():
            return t2t_fast.soft_split(x, 3, 2, 1, w, b, nw, nb)

    def fwd_bwd():
        for t in (x, w, b, nw, nb):
            t.grad = None
        t2t_fast.soft_split(x, 3, 2, 1, w, b, nw, nb).backward(dy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _performer_calls() -> dict[str, Callable[[], object]]:
    import t2t_fast

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 196, 64, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(32, 64, generator=g)
    dy = torch.randn(2, 196, 64, generator=g)

    def fwd():
        with torch.no_grad():
            return t2t_fast.performer_attention(q, k, v, w)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        t2t_fast.performer_attention(q, k, v, w).backward(dy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


OPS = {"soft_split": _soft_split_calls, "performer": _performer_calls}


def measure(op: str, rounds: int = 7, calls: int = 50) -> list[dict]:
    """Per direction of ``op`` (triton backend): launches per call (by kernel) and the median host us/call."""
    import t2t_fast

    rows = []
    with t2t_fast.backend("triton"), LaunchCounter() as counter:
        for direction, fn in OPS[op]().items():
            for _ in range(5):  # planning caches, first-call work
                fn()
            counter.launches.clear()
            fn()
            launches = dict(counter.launches)
            per_round = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_round.append((time.perf_counter() - t0) / calls * 1e6)
            rows.append(dict(op=op, direction=direction, launches=sum(launches.values()),
                             kernels=" ".join(f"{k}x{n}" if n > 1 else k for k, n in sorted(launches.items())),
                             host_us=round(statistics.median(per_round), 1)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    rows = [row for op in OPS for row in measure(op, rounds=args.rounds)]
    common.print_table("host cost per front-door call (CPU, launches stubbed)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
