"""Soft split benchmark: the Triton backend of ``t2t_fast.soft_split`` against the reference, per T2T stage.

The three soft splits of T2T-ViT-14 (token performer), each fused with what follows it in the model:

- stage 0: image (B, 3, H, W), unfold k7 s4 p2 (K=147), LayerNorm(147) + kqv Linear(147, 192)
- stage 1: tokens (B, H*W/16, 64) viewed as (B, 64, H/4, W/4), unfold k3 s2 p1 (K=576), LayerNorm + kqv (576 -> 192)
- stage 2: tokens (B, H*W/64, 64) viewed as (B, 64, H/8, W/8), unfold k3 s2 p1, project Linear(576, 384)

``fused`` is ``t2t_fast.soft_split`` under ``t2t_fast.backend('triton')``; ``reference`` is
``t2t_fast.reference.soft_split`` (F.unfold + transpose + LayerNorm + Linear), eager and ``torch.compile``d;
``conv-folded`` (eager) is the same function as a cuDNN user would write it, without the unfolded tensor
(``conv_folded``): the LayerNorm folded into a convolution with ``W * gamma``.
Inputs, weights and outputs are in the benchmark dtype (the fused op's LayerNorm parameters in fp32, as its front
door makes them). ``fwd`` runs under ``no_grad``; ``fwd+bwd`` is forward and backward of ``sum(y * g)`` with the
weights (and the token input of stages 1-2) requiring grad.

Per row: ``ms``, the median GPU time of one call replayed from a CUDA graph (``timing`` = graph; eager if the
capture failed, with ``graph_note``), and ``eager_ms``, one eager call after another with the host's launch
overhead (``triton.testing.do_bench``: warm-up, L2 flushed between calls for both), ``peak_mib`` (the
``max_memory_allocated`` delta of one call), ``act_mib`` for ``fwd+bwd`` (what the forward leaves allocated for
the backward besides its output), and for fused forwards the achieved bandwidth (bytes of x read + y written +
parameters, over the time) as a fraction of the device's copy bandwidth measured in the same run. The summary
judges the targets per shape: fwd+bwd >= 4x the eager reference and >= 2x the compiled one, activation memory
<= 1/4 of the reference's, forward >= 60% of copy bandwidth.

    python benchmarks/bench_soft_split.py [--quick] [--out DIR]   # needs a CUDA device
    python benchmarks/bench_soft_split.py --smoke                   # tiny CPU run (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# stage -> (channels, image downsampling, kernel, stride, padding, out features, token input, LayerNorm)
STAGES = {
    0: (3, 1, 7, 4, 2, 192, False, True),
    1: (64, 4, 3, 2, 1, 192, True, True),
    2: (64, 8, 3, 2, 1, 384, True, False),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GOALS = {"vs_eager": 4.0, "vs_compile": 2.0, "act_ratio": 0.25, "bw_frac": 0.6}


class Case:
    """Inputs and parameters of one stage at one image size, batch and dtype."""

    def __init__(self, stage: int, img: int, batch: int, dtype: torch.dtype, device: torch.device):
        chans, down, self.k, self.s, self.p, out, self.tokens, norm = STAGES[stage]
        self.side = img // down
        K = chans * self.k * self.k
        gen = torch.Generator(device=device).manual_seed(stage)
        rand = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
        if self.tokens:  # the token layer's (B, L, C) output, re-structurized as an image view
            self.inp = rand(batch, self.side * self.side, chans).to(dtype)
        else:
            self.inp = rand(batch, chans, self.side, self.side).to(dtype)
        self.weight = (rand(out, K) / K**0.5).to(dtype)
        self.bias = rand(out).to(dtype)
        self.norm = (1 + 0.1 * rand(K), 0.1 * rand(K)) if norm else (None, None)
        lh = (self.side + 2 * self.p - self.k) // self.s + 1
        self.grad = rand(batch, lh * lh, out).to(dtype)
        self.out_bytes = self.grad.numel() * self.grad.element_size()

    def image(self, inp: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return inp
        B, L, C = inp.shape
        return inp.transpose(1, 2).reshape(B, C, self.side, self.side)

    def leaves(self, impl: str, backward: bool) -> list[Optional[torch.Tensor]]:
        """Fresh leaves [input, weight, bias, norm_weight, norm_bias] for one implementation."""
        ln_dtype = torch.float32 if impl == "fused" else self.inp.dtype
        ts = [self.inp, self.weight, self.bias] + [t.to(ln_dtype) if t is not None else None for t in self.norm]
        grads = [backward and self.tokens] + [backward] * 4
        return [t.detach().clone().requires_grad_(g) if t is not None else None for t, g in zip(ts, grads)]

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias, *self.norm) if t is not None)


def conv_folded(x: torch.Tensor, kernel_size: int, stride: int, padding: int, weight: torch.Tensor,
                bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                norm_bias: Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """``reference.soft_split`` through convolutions: x (B, C, H, W), weight (out, C*k*k) -> (B, L, out).

    LN(unfold(x)) W^T + b = rstd * (conv(x, W*gamma) - mean * rowsum(W*gamma)) + W beta + b, with the patch
    mean and E[x^2] from a convolution with a kernel of ones (its zero padding matches unfold's)."""
    out, K = weight.shape
    C = x.shape[1]
    conv = dict(stride=stride, padding=padding)
    w4 = weight.view(out, C, kernel_size, kernel_size)
    if norm_weight is None:
        y = torch.nn.functional.conv2d(x, w4, bias, **conv)
        return y.flatten(2).transpose(1, 2)
    wg = w4 * norm_weight.view(1, C, kernel_size, kernel_size).to(weight.dtype)
    ones = torch.ones((1, C, kernel_size, kernel_size), dtype=x.dtype, device=x.device)
    mean = torch.nn.functional.conv2d(x, ones, **conv).float() / K
    ex2 = torch.nn.functional.conv2d(x * x, ones, **conv).float() / K
    rstd = torch.rsqrt((ex2 - mean * mean).clamp_min(0) + eps)
    shift = weight.float() @ norm_bias.float() if norm_bias is not None else torch.zeros(out, device=x.device)
    if bias is not None:
        shift = shift + bias.float()
    acc = torch.nn.functional.conv2d(x, wg, **conv).float()
    y = rstd * (acc - mean * wg.float().sum((1, 2, 3)).view(1, out, 1, 1)) + shift.view(1, out, 1, 1)
    return y.to(x.dtype).flatten(2).transpose(1, 2)


def make_op(case: Case, impl: str, mode: str) -> Callable:
    """(inp, weight, bias, norm_weight, norm_bias) -> y for one implementation and mode."""
    import t2t_fast
    from t2t_fast import reference

    k, s, p = case.k, case.s, case.p
    if impl == "fused":
        def fused(inp, w, b, nw, nb):
            with t2t_fast.backend("triton"):
                return t2t_fast.soft_split(case.image(inp), k, s, p, w, b, nw, nb)
        return fused

    if impl == "conv-folded":
        def folded(inp, w, b, nw, nb):
            return conv_folded(case.image(inp), k, s, p, w, b, nw, nb)
        return folded

    def ref(inp, w, b, nw, nb):
        return reference.soft_split(case.image(inp), k, s, p, w, b, nw, nb)
    return torch.compile(ref, dynamic=False) if mode == "compile" else ref


def measure(case: Case, impl: str, mode: str, direction: str, args: argparse.Namespace,
            copy_gbps: Optional[float]) -> dict:
    op = make_op(case, impl, mode)
    leaves = case.leaves(impl, direction == "fwd+bwd")
    grads = [t for t in leaves if t is not None and t.requires_grad]
    forward = None
    if direction == "fwd":
        def call():
            with torch.no_grad():
                return op(*leaves)
    else:
        def forward():
            return op(*leaves)

        def call():
            forward().backward(case.grad)
    row = common.measure_row(call, forward, warmup=args.warmup, rep=args.rep, grad_to_none=grads)
    if direction == "fwd" and impl == "fused":
        x_bytes = case.inp.numel() * case.inp.element_size()
        row["gbps"] = (x_bytes + case.out_bytes + case.param_bytes()) / (row["ms"] * 1e-3) / 1e9
        if copy_gbps:
            row["bw_frac"] = row["gbps"] / copy_gbps
    return row


def cases(args: argparse.Namespace) -> list[tuple]:
    """(stage, img, batch, dtype, direction, impl, mode); eager rows first, compiled ones (slow to build) last."""
    eager = [(st, img, args.batch, dt, d, impl, "eager") for img in args.sizes for dt in args.dtypes
             for st in args.stages for d in ("fwd", "fwd+bwd") for impl in ("fused", "reference", "conv-folded")]
    compiled = [(st, img, args.batch, dt, "fwd+bwd", "reference", "compile") for img in args.sizes
                for dt in args.dtypes for st in args.stages] if "compile" in args.modes else []
    return eager + compiled


def summary(rows: list[dict], copy_gbps: Optional[float]) -> list[dict]:
    """One line per (stage, img, dtype): times, ratios and the targets' pass/miss."""
    ok = {(r["stage"], r["img"], r["dtype"], r["direction"], r["impl"], r["mode"]): r for r in rows
          if r.get("status") == "ok"}
    out = []
    for key in dict.fromkeys((r["stage"], r["img"], r["dtype"]) for r in rows):
        get = lambda d, i, m: ok.get(key + (d, i, m), {})  # noqa: E731
        f_fwd, r_fwd = get("fwd", "fused", "eager"), get("fwd", "reference", "eager")
        f_fb, r_fb, c_fb = get("fwd+bwd", "fused", "eager"), get("fwd+bwd", "reference", "eager"), \
            get("fwd+bwd", "reference", "compile")
        line = dict(stage=key[0], img=key[1], dtype=key[2], fwd_ms=f_fwd.get("ms"), ref_fwd_ms=r_fwd.get("ms"),
                    fwd_bwd_ms=f_fb.get("ms"), ref_eager_ms=r_fb.get("ms"), ref_compile_ms=c_fb.get("ms"),
                    conv_folded_ms=get("fwd+bwd", "conv-folded", "eager").get("ms"), timing=f_fb.get("timing"),
                    fwd_bwd_call_ms=f_fb.get("eager_ms"), ref_call_ms=r_fb.get("eager_ms"))
        line["vs_conv_folded"] = common.speedup(get("fwd+bwd", "conv-folded", "eager"), f_fb)
        line["vs_eager"] = common.speedup(r_fb, f_fb)
        line["vs_compile"] = common.speedup(c_fb, f_fb)
        line["act_ratio"] = common.ratio(f_fb.get("act_mib"), r_fb.get("act_mib"))
        line["bw_frac"] = common.ratio(f_fwd.get("gbps"), copy_gbps)
        for name, goal in GOALS.items():
            line[f"{name}_target"] = common.target(line[name], goal, at_most=name == "act_ratio")
        out.append(line)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for soft_split.csv and soft_split.json")
    p.add_argument("--quick", action="store_true", help="224 px bf16 only (benchmarks/gpu.sh)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--stages", nargs="+", type=int, default=list(STAGES), choices=list(STAGES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="reference modes (the fused op runs eager)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.dtypes = [224], ["bf16"]
    if args.smoke:
        args.sizes, args.dtypes, args.batch, args.modes = [32], ["fp32"], 2, ["eager"]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = common.bench_device("bench_soft_split", args.smoke)
    if device is None:
        return 0
    copy_gbps = common.copy_bandwidth(device)
    name = common.device_name(device)
    print(f"bench_soft_split on {name}, B={args.batch}; copy bandwidth "
          + (f"{copy_gbps:.0f} GB/s" if copy_gbps else "not measured"), flush=True)
    meta = dict(device=name, batch=args.batch, copy_gbps=copy_gbps, goals=GOALS, torch=torch.__version__)

    def measure_case(stage: int, img: int, batch: int, dt: str, direction: str, impl: str, mode: str) -> dict:
        return measure(Case(stage, img, batch, DTYPES[dt], device), impl, mode, direction, args, copy_gbps)

    rows = common.run_cases(("stage", "img", "batch", "dtype", "direction", "impl", "mode"), cases(args),
                            measure_case, "stage {stage} {img}px {dtype} {direction} {impl} {mode}", args.out,
                            "soft_split", meta)
    common.report_targets("soft_split", "soft_split", "soft_split: fused (triton) vs reference, targets "
                          "(fwd+bwd >= 4x eager, >= 2x compiled; activations <= 1/4; forward >= 60% copy bandwidth)",
                          rows, summary(rows, copy_gbps), args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
