"""Performer attention benchmark: the Triton backend of ``t2t_fast.performer_attention`` against the reference.

The token performer's attention core at d = 64, m = 32 on q, k, v that are ``torch.split`` views of one packed
(B, T, 3d) projection, as in the model: B = 64 at T = 784, 3136 (224 px), 9216 (384 px) and B = 4 at T = 65536.

- ``fused``: ``t2t_fast.performer_attention`` under ``t2t_fast.backend('triton')`` (features recomputed in
  registers, nothing of size T x m stored);
- ``reference``: ``t2t_fast.reference.performer_attention`` (the published einsum arithmetic in float32), eager and
  ``torch.compile``d;
- ``sdpa``: softmax attention on the same q, k, v as one head, ``F.scaled_dot_product_attention`` (what a
  ``_t`` token layer would cost instead).

``fwd`` runs under ``no_grad``; ``fwd+bwd`` is the forward and ``torch.autograd.grad`` of the packed projection.
Per row: ``ms``, the median GPU time of one call replayed from a CUDA graph (``timing`` = graph; eager if the
capture failed, with ``graph_note``), and ``eager_ms``, one eager call after another with the host's launch
overhead (``triton.testing.do_bench``: warm-up, L2 flushed between calls for both), ``peak_mib`` (the
``max_memory_allocated`` delta of one call: peak extra memory, outputs and gradients included), ``act_mib`` for
``fwd+bwd`` (what the forward keeps for the backward besides its output) and, for fused forwards, the achieved
bandwidth of the minimal traffic (q, k, v read, y written) as a fraction of the device's copy bandwidth.
The summary judges the targets per shape and dtype: fwd+bwd >= 5x the eager reference and >= 2x the compiled
one, peak extra memory of fwd+bwd <= 1/8 of the eager reference's, fwd+bwd faster than SDPA from T = 3136 up.

    python benchmarks/bench_performer.py [--quick] [--out DIR]   # needs a CUDA device
    python benchmarks/bench_performer.py --smoke                   # tiny CPU run (Triton interpreter)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

D, M = 64, 32
SHAPES = [(64, 784), (64, 3136), (64, 9216), (4, 65536)]  # (B, T)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GOALS = {"vs_eager": 5.0, "vs_compile": 2.0, "mem_ratio": 1 / 8, "vs_sdpa": 1.0}
SDPA_FROM_T = 3136  # the SDPA target applies from this sequence length up


class Case:
    """The packed projection, the features and the output gradient of one (B, T, dtype)."""

    def __init__(self, B: int, T: int, dtype: torch.dtype, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(T)
        self.x = torch.randn(B, T, 3 * D, device=device, generator=gen).to(dtype)
        self.w = (torch.nn.init.orthogonal_(torch.randn(M, D)) * math.sqrt(M)).to(device)
        self.grad = torch.randn(B, T, D, device=device, generator=gen).to(dtype)
        self.io_bytes = 4 * B * T * D * self.x.element_size()  # q, k, v read + y written


def make_op(case: Case, impl: str, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Packed projection (B, T, 3d) -> attention output (B, T, d) for one implementation and mode."""
    import t2t_fast
    from t2t_fast import reference

    w = case.w
    if impl == "fused":
        def fused(x):
            k, q, v = torch.split(x, D, dim=-1)
            with t2t_fast.backend("triton"):
                return t2t_fast.performer_attention(q, k, v, w)
        return fused
    if impl == "sdpa":
        def sdpa(x):
            k, q, v = (t.unsqueeze(1) for t in torch.split(x, D, dim=-1))
            return F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return sdpa

    def ref(x):
        k, q, v = torch.split(x, D, dim=-1)
        return reference.performer_attention(q, k, v, w)
    if mode != "compile":
        return ref
    torch._dynamo.reset()  # one code object compiled for many shapes would hit dynamo's recompile limit (-> eager)
    return torch.compile(ref, dynamic=False)


def measure(case: Case, impl: str, mode: str, direction: str, args: argparse.Namespace,
            copy_gbps: Optional[float]) -> dict:
    op = make_op(case, impl, mode)
    x = case.x.detach().clone().requires_grad_(direction == "fwd+bwd")
    forward = None
    if direction == "fwd":
        def call():
            with torch.no_grad():
                return op(x)
    else:
        def forward():
            return op(x)

        def call():
            return torch.autograd.grad(forward(), x, case.grad)
    row = common.measure_row(call, forward, warmup=args.warmup, rep=args.rep)
    if direction == "fwd" and impl == "fused":
        row["gbps"] = case.io_bytes / (row["ms"] * 1e-3) / 1e9
        if copy_gbps:
            row["bw_frac"] = row["gbps"] / copy_gbps
    return row


def cases(args: argparse.Namespace) -> list[tuple]:
    """(B, T, dtype, direction, impl, mode); compiled references (slow to build) last, --quick compiles only
    the fwd+bwd one (the one the targets judge)."""
    eager = [(B, T, dt, d, impl, "eager") for B, T in args.shapes for dt in args.dtypes
             for d in ("fwd", "fwd+bwd") for impl in ("fused", "reference", "sdpa")]
    compiled = [(B, T, dt, d, "reference", "compile") for B, T in args.shapes for dt in args.dtypes
                for d in (("fwd+bwd",) if args.quick else ("fwd", "fwd+bwd"))] if "compile" in args.modes else []
    return eager + compiled


def summary(rows: list[dict], copy_gbps: Optional[float]) -> list[dict]:
    """One line per (B, T, dtype): times, ratios and the targets' pass/miss."""
    ok = {(r["B"], r["T"], r["dtype"], r["direction"], r["impl"], r["mode"]): r for r in rows
          if r.get("status") == "ok"}
    out = []
    for key in dict.fromkeys((r["B"], r["T"], r["dtype"]) for r in rows):
        get = lambda d, i, m="eager": ok.get(key + (d, i, m), {})  # noqa: E731
        fb, ref_fb, comp_fb, sdpa_fb = (get("fwd+bwd", "fused"), get("fwd+bwd", "reference"),
                                        get("fwd+bwd", "reference", "compile"), get("fwd+bwd", "sdpa"))
        fwd, ref_fwd, comp_fwd, sdpa_fwd = (get("fwd", "fused"), get("fwd", "reference"),
                                            get("fwd", "reference", "compile"), get("fwd", "sdpa"))
        line = dict(B=key[0], T=key[1], dtype=key[2],
                    fwd_ms=fwd.get("ms"), ref_fwd_ms=ref_fwd.get("ms"), comp_fwd_ms=comp_fwd.get("ms"),
                    sdpa_fwd_ms=sdpa_fwd.get("ms"), bw_frac=common.ratio(fwd.get("gbps"), copy_gbps),
                    fwd_bwd_ms=fb.get("ms"), ref_eager_ms=ref_fb.get("ms"), ref_compile_ms=comp_fb.get("ms"),
                    sdpa_ms=sdpa_fb.get("ms"), peak_mib=fb.get("peak_mib"), ref_peak_mib=ref_fb.get("peak_mib"),
                    fwd_vs_eager=common.speedup(ref_fwd, fwd), fwd_vs_sdpa=common.speedup(sdpa_fwd, fwd),
                    vs_eager=common.speedup(ref_fb, fb), vs_compile=common.speedup(comp_fb, fb),
                    mem_ratio=common.ratio(fb.get("peak_mib"), ref_fb.get("peak_mib")),
                    vs_sdpa=common.speedup(sdpa_fb, fb), timing=fb.get("timing"),
                    fwd_bwd_call_ms=fb.get("eager_ms"), ref_call_ms=ref_fb.get("eager_ms"))
        for name, goal in GOALS.items():
            v = None if name == "vs_sdpa" and key[1] < SDPA_FROM_T else line[name]
            line[f"{name}_target"] = common.target(v, goal, at_most=name == "mem_ratio", strict=name == "vs_sdpa")
        out.append(line)
    return out


def _shape(s: str) -> tuple[int, int]:
    B, T = s.lower().split("x")
    return int(B), int(T)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for performer.csv, performer.json and performer_summary.{csv,json}")
    p.add_argument("--quick", action="store_true",
                   help="B=64, T=3136, bf16 only, compiled fwd+bwd only (benchmarks/gpu.sh)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    p.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="BxT",
                   help="batch x tokens, e.g. 64x3136 (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="reference modes (fused and sdpa run eager)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes = [(64, 3136)], ["bf16"]
    if args.smoke:
        args.shapes, args.dtypes, args.modes = [(2, 40)], ["fp32"], ["eager"]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = common.bench_device("bench_performer", args.smoke)
    if device is None:
        return 0
    copy_gbps = common.copy_bandwidth(device)
    name = common.device_name(device)
    print(f"bench_performer on {name}, d={D}, m={M}; copy bandwidth "
          + (f"{copy_gbps:.0f} GB/s" if copy_gbps else "not measured"), flush=True)
    meta = dict(device=name, d=D, m=M, copy_gbps=copy_gbps, goals=GOALS, sdpa_from_t=SDPA_FROM_T,
                torch=torch.__version__)
    case_cache: dict = {}

    def measure_case(B: int, T: int, dt: str, direction: str, impl: str, mode: str) -> dict:
        if (B, T, dt) not in case_cache:  # consecutive rows of one shape share its inputs
            case_cache.clear()
            common.free_memory()
            case_cache[(B, T, dt)] = Case(B, T, DTYPES[dt], device)
        return measure(case_cache[(B, T, dt)], impl, mode, direction, args, copy_gbps)

    rows = common.run_cases(("B", "T", "dtype", "direction", "impl", "mode"), cases(args), measure_case,
                            "B={B} T={T} {dtype} {direction} {impl} {mode}", args.out, "performer", meta)
    common.report_targets("performer", "performer_attention",
                          "performer_attention: fused (triton) vs reference and SDPA, targets (fwd+bwd >= 5x eager, "
                          f">= 2x compiled; peak memory <= 1/8 of eager; faster than SDPA from T={SDPA_FROM_T})",
                          rows, summary(rows, copy_gbps), args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
