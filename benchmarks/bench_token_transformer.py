"""Token transformer stage of the ``_t`` models: fused soft split + SDPA against unfold + explicit attention.

The stage is one token layer applied to the soft split of its input image, as in T2T-ViT_t:

- stage 1: image (B, 3, H, W) -> unfold k7 s4 p2 -> TokenTransformer(147 -> 64): (B, H*W/16, 64)
- stage 2: image (B, 64, H/4, W/4) -> unfold k3 s2 p1 -> TokenTransformer(576 -> 64): (B, H*W/64, 64)

``reference``: ``nn.Unfold`` + ``reference.TokenTransformer`` (the unfolded tensor and the T x T attention map
in memory), eager and ``torch.compile``d. ``fused``: ``t2t_fast.models.fused.transformer_layer`` (the soft split
with the LayerNorm and the qkv projection inside, backend auto; ``scaled_dot_product_attention``), eager and
compiled. ``bf16`` runs under bf16 autocast with fp32 weights (as the model trains), ``fp32`` without autocast;
stage 2's input is the token layer's output (bf16 under autocast). ``fwd`` is a ``no_grad`` forward,
``fwd+bwd`` forward and backward of ``sum(y * g)`` (weights, and stage 2's input, get gradients).

Per row: ``ms``, the median GPU time of one call replayed from a CUDA graph (``timing`` = graph; eager if the
capture failed, with ``graph_note``), and ``eager_ms``, eager calls with the host's launch overhead and inputs
rotated (``triton.testing.do_bench``: warm-up, L2 flushed between calls for both), ``peak_mib`` (the
``max_memory_allocated`` delta of one call), ``act_mib`` for ``fwd+bwd`` (what the forward keeps for the
backward), and a roofline: max(FLOPs / matmul rate, minimal bytes / copy bandwidth), both measured on the
device first; ``roofline_pct`` is the roofline time over the measured time.

    python benchmarks/bench_token_transformer.py [--quick] [--out DIR]   # needs a CUDA device
    python benchmarks/bench_token_transformer.py --smoke                   # tiny CPU check of the script
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional

import torch
import torch.nn as nn

from t2t_fast import reference
from t2t_fast.models.fused import transformer_layer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# stage -> (input channels, unfold kernel, stride, padding, input downsampling from the image)
STAGES = {1: (3, 7, 4, 2, 1), 2: (64, 3, 2, 1, 4)}
TOKEN_DIM = 64
ROTATE_BYTES = 256 * 2**20  # the rotated inputs of one case add up to about this (at least 2 of them)


class Stage(nn.Module):
    """One token-transformer stage: (B, C, H, W) image -> (B, L, 64) tokens, fused or reference."""

    def __init__(self, stage: int, fused: bool):
        super().__init__()
        chans, k, s, p, _ = STAGES[stage]
        self.unfold = nn.Unfold(kernel_size=k, stride=s, padding=p)
        self.layer = reference.TokenTransformer(dim=chans * k * k, in_dim=TOKEN_DIM, num_heads=1)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return transformer_layer(self.layer, x, self.unfold)
        return self.layer(self.unfold(x).transpose(1, 2))


def geometry(stage: int, img: int) -> tuple[tuple[int, int, int], int, int]:
    """(C, H, W) of the stage's input image, its token count T and the patch width K."""
    chans, k, s, p, down = STAGES[stage]
    side = img // down
    out = (side + 2 * p - k) // s + 1
    return (chans, side, side), out * out, chans * k * k


def flops_and_bytes(stage: int, img: int, batch: int, direction: str, elt: int) -> tuple[float, float]:
    """Model FLOPs and minimal memory traffic of one call (a backward counts twice the forward's FLOPs)."""
    (c, h, w), t, k = geometry(stage, img)
    d = TOKEN_DIM
    fwd = 2 * t * k * 3 * d + 2 * 2 * t * t * d + 3 * 2 * t * d * d  # qkv; QK^T and PV; proj + 2-layer MLP
    x_bytes, y_bytes = c * h * w * elt, t * d * elt
    if direction == "fwd":
        return batch * fwd, batch * (x_bytes + y_bytes)
    # the backward reads x and dy again and writes dx for stage 2 (stage 1's image needs no gradient)
    return batch * 3 * fwd, batch * (2 * x_bytes + 2 * y_bytes + (x_bytes if stage == 2 else 0))


def measure(net: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], direction: str, dtype: str,
            device: torch.device, args: argparse.Namespace) -> dict:
    """Time and memory of ``net`` on the rotated inputs: forward (no_grad) or forward + backward."""
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    params = list(net.parameters())

    def forward(inp: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with autocast():
            return net(inp[0])

    def call(inp: tuple[torch.Tensor, torch.Tensor]) -> None:
        if direction == "fwd":
            with torch.no_grad():
                forward(inp)
            return
        x, g = inp
        y = forward(inp)
        y.backward(g if g.dtype == y.dtype else g.to(y.dtype))
        x.grad = None
        for prm in params:
            prm.grad = None

    call(data[0])  # compilation, Triton JIT, allocator warm-up
    turn = itertools.cycle(data)
    return common.measure_row(lambda: call(data[0]), (lambda: forward(data[0])) if direction == "fwd+bwd" else None,
                              warmup=args.warmup, rep=args.rep, timed=lambda: call(next(turn)))


def measure_case(stage: int, img: int, batch: int, dtype: str, direction: str, impl: str, mode: str,
             args: argparse.Namespace, device: torch.device, peaks: dict) -> dict:
    """Build the stage and its rotated inputs for one case; its measurements and roofline (CUDA only)."""
    torch.manual_seed(0)
    module = Stage(stage, fused=impl == "fused").to(device)
    net = torch.compile(module) if mode == "compile" else module
    (c, h, w), t, _ = geometry(stage, img)
    in_dtype = torch.bfloat16 if dtype == "bf16" and stage == 2 else torch.float32
    out_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    count = max(2, min(8, ROTATE_BYTES // (batch * c * h * w * 4)))
    data = [(torch.randn(batch, c, h, w, device=device, dtype=in_dtype).requires_grad_(stage == 2),
             torch.randn(batch, t, TOKEN_DIM, device=device, dtype=out_dtype)) for _ in range(count)]
    row = measure(net, data, direction, dtype, device, args)
    flops, nbytes = flops_and_bytes(stage, img, batch, direction, 2 if dtype == "bf16" else 4)
    rate, bw = peaks.get(f"matmul_tflops_{dtype}"), peaks.get("copy_gbps")
    if rate and bw:
        roof_ms = max(flops / (rate * 1e12), nbytes / (bw * 1e9)) * 1e3
        row.update(roofline_ms=roof_ms, roofline_pct=100 * roof_ms / row["ms"])
    return row


def cases(args: argparse.Namespace) -> list[tuple]:
    """(stage, img, batch, dtype, direction, impl, mode), reference and fused of one case side by side."""
    if args.smoke:
        return [(s, 32, 2, dt, d, i, "eager") for s in (1, 2) for dt, d in (("fp32", "fwd"), ("bf16", "fwd+bwd"))
                for i in ("reference", "fused")]
    if args.quick:  # eager rows only: a compiled stage took over a minute to build on an H200 machine
        return [(s, 224, 32, "bf16", d, i, "eager") for s in (1, 2) for d in ("fwd", "fwd+bwd")
                for i in ("reference", "fused")]
    return [(s, img, b, dt, d, i, m) for img in args.sizes for s in (1, 2) for b in args.batches
            for dt in ("bf16", "fp32") for d in ("fwd", "fwd+bwd") for m in args.modes for i in ("reference", "fused")]


def tables(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, rows) of the comparison table: each fused row against the reference in its mode and eager."""
    ref = {(r["stage"], r["img"], r["batch"], r["dtype"], r["direction"], r["mode"]): r for r in rows
           if r["impl"] == "reference" and r.get("status") == "ok"}
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    table = []
    for r in rows:
        key = (r["stage"], r["img"], r["batch"], r["dtype"], r["direction"])
        fused = r["impl"] == "fused" and r.get("status") == "ok"
        base, base_eager = ref.get(key + (r["mode"],), {}), ref.get(key + ("eager",), {})
        base_compiled = ref.get(key + ("compile",), {})
        table.append(dict(
            stage=r["stage"], px=r["img"], B=r["batch"], dtype=r["dtype"], dir=r["direction"], impl=r["impl"],
            mode=r["mode"], ms=r.get("ms"),
            vs_ref_eager=ratio(base_eager.get("ms"), r.get("ms")) if fused else None,
            vs_ref_compiled=ratio(base_compiled.get("ms"), r.get("ms")) if fused else None,
            peak_mib=r.get("peak_mib"),
            mem_ratio=ratio(r.get("peak_mib"), base.get("peak_mib")) if fused else None,
            act_mib=r.get("act_mib"), roofline_pct=r.get("roofline_pct"), status=r.get("status")))
    return [("Token transformer stage (vs_ref_*: reference ms / fused ms; mem_ratio: fused / reference peak, "
             "same mode)", table)]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for token_transformer.csv and token_transformer.json")
    p.add_argument("--quick", action="store_true", help="224 px, B=32, bf16 (benchmarks/gpu.sh)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script (no numbers)")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 25 if args.quick else 50)
    args.rep = args.rep if args.rep is not None else (1 if args.smoke else 100 if args.quick else 400)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = common.bench_device("bench_token_transformer", args.smoke)
    if device is None:
        return 0
    name = common.device_name(device)
    peaks = common.roofline_peaks(device)
    print(f"bench_token_transformer on {name}; {common.describe_peaks(peaks)}", flush=True)
    meta = dict(device=name, peaks=peaks, quick=args.quick, smoke=args.smoke, torch=torch.__version__)
    rows = common.run_cases(("stage", "img", "batch", "dtype", "direction", "impl", "mode"), cases(args),
                            lambda *case: measure_case(*case, args=args, device=device, peaks=peaks),
                            "stage {stage} {img}px B={batch} {dtype} {direction} {impl} {mode}", args.out,
                            "token_transformer", meta)
    for title, table in tables(rows):
        common.print_table(title, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
