"""Measured GPU time of every kernel launch of the fused ops, at the static model's cases: the numbers to hold
``benchmarks/results/static-sm90.md``'s per-kernel predictions against.

The cases, inputs and calls are ``static_sm90.py``'s (B=64, bf16, T2T-ViT-14: soft split stage 1, 2, final and
stage 1 at 384 px; performer T=3136 and 9216), made on the GPU and filled with random numbers; the kernels' host
functions (``t2t_fast.kernels.<op>.forward`` / ``backward``) run them, as the static model compiles them. Each
direction is repeated under ``torch.profiler`` (CUDA activity: the device time of each kernel, from CUPTI), after
a warm-up; a row is one kernel of one case and direction: its launches and its mean device time per call, and a
``total`` row per direction sums them (host time between launches is not in it: see ``host_overhead.py``).

    python benchmarks/kernel_times.py [--out DIR] [--iters N]   # needs a CUDA device
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import static_sm90 as sm  # noqa: E402


def _random(t: torch.Tensor) -> torch.Tensor:
    return t.normal_() if t.is_floating_point() else t


def calls(op: str, case: str, device: torch.device) -> dict[str, Callable[[], object]]:
    """direction -> a call of the kernels' host function on fresh random inputs of the static model's case."""
    from t2t_fast.kernels import performer, soft_split

    if op == "soft_split":
        inp = sm._soft_split_inputs(case, device, _random)
        x = sm._image(inp, inp["leaf"])
        geo = ([inp["k"]] * 2, [inp["s"]] * 2, [inp["p"]] * 2)
        args = (inp["weight"], inp["bias"], inp["norm_weight"], inp["norm_bias"])
        y, mean, rstd = soft_split.forward(x, *geo, *args, 1e-5)
        dy = torch.randn_like(y)
        return {"fwd": lambda: soft_split.forward(x, *geo, *args, 1e-5),
                "bwd": lambda: soft_split.backward(dy, x, *geo, *args, y, mean, rstd, inp["grad_x"])}
    inp = sm._performer_inputs(case, device, _random)
    inp["w"].normal_()
    y, *stats = performer.forward(inp["q"], inp["k"], inp["v"], inp["w"], 1e-8)
    dy = torch.randn_like(y)
    return {"fwd": lambda: performer.forward(inp["q"], inp["k"], inp["v"], inp["w"], 1e-8),
            "bwd": lambda: performer.backward(dy, inp["q"], inp["k"], inp["v"], inp["w"], *stats)}


def kernel_rows(fn: Callable[[], object], iters: int) -> list[dict]:
    """One row per kernel name: launches per call and mean device microseconds per call (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = e.cuda_time_total if us is None else us
        if us > 0:
            per[e.key][0] += e.count
            per[e.key][1] += us
    return [dict(kernel=k, launches=n / iters, us=us / iters) for k, (n, us) in sorted(per.items())]


def measure(iters: int) -> list[dict]:
    """Every case and direction of the static model: its kernels' rows and a total."""
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    cases = [("soft_split", c) for c in sm.SOFT_SPLIT_CASES] + [("performer", c) for c in sm.PERFORMER_CASES]
    for op, case in cases:
        torch.manual_seed(0)
        try:
            for direction, fn in calls(op, case, device).items():
                found = kernel_rows(fn, iters)
                rows += [dict(op=op, case=case, direction=direction, **r) for r in found]
                rows.append(dict(op=op, case=case, direction=direction, kernel="total",
                                 launches=sum(r["launches"] for r in found), us=sum(r["us"] for r in found)))
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            rows.append(dict(op=op, case=case, kernel="error", status=common.describe_error(e)))
        common.free_memory()
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for kernel_times.csv and kernel_times.json")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_times: no CUDA device; nothing measured")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    rows = measure(args.iters)
    common.print_table("kernel times (device us per call, torch.profiler; compare static-sm90.md)", rows)
    if args.out:
        common.write_results(args.out, "kernel_times", rows, dict(device=common.device_name(device),
                                                                  iters=args.iters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
