"""CPU benchmark: the T2T module of t2t_vit_14 (performer tokens, embed 384), forward + backward, fp32.

The reference module (``t2t_fast.reference.T2TModule``, which materializes every unfolded patch tensor and the
performer's feature tensors) against the same weights in ``t2t_fast.models.FusedT2TModule`` on the fused C++ CPU
kernels (``cpu`` backend): each soft split runs with its token layer's norm1 and kqv projection as one op and the
performer core as another. ``fused_recompute`` is the fused module with T2T gradient checkpointing (the token
layers recompute their activations in the backward; ``model.set_grad_checkpointing(True, 't2t')``).

``--model t2t_vit_14`` measures the whole model instead (forward + backward of the logits): the reference
``t2t_fast.reference.T2TViT`` against ``create_model("t2t_vit_14")`` (fused T2T module and SDPA attention in the
blocks) on the same weights; ``fused_recompute`` adds ``set_grad_checkpointing(True, 'all')``. The 1024 px row:
``--model t2t_vit_14 --batch 1 --img 1024 --iters 1 --rounds 1`` (the reference side needs about 8 GB).

Both run in eval mode (dropout off, so they compute the same function). Each side runs in its own subprocess,
the sides alternating over several rounds (so load from other processes hits both alike): per round, time is
the median of several forward+backward passes after a warm-up, and peak RSS growth is the process's peak
resident set (ru_maxrss) after the passes minus the peak before the first one (model and input already built, and
one single-image pass done so one-time imports and initialization are not counted).
The table gives the median over rounds (min: the fastest pass of all); "saved for backward" adds up the storages
autograd keeps between forward and backward (weights and the image included).

    python benchmarks/bench_cpu.py [--model t2t|t2t_vit_14] [--batch 8] [--img 224] [--iters 5] [--rounds 3]
                                   [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


MODELS = ("t2t", "t2t_vit_14")


def build(batch: int, img: int, model: str = "t2t"):
    """The reference module (``model`` 't2t': the T2T module of t2t_vit_14; 't2t_vit_14': the whole model)."""
    from t2t_fast import reference

    torch.manual_seed(0)
    if model == "t2t":
        module = reference.T2TModule(img, "performer", embed_dim=384)
    else:
        module = reference.T2TViT(img, "performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    image = torch.randn(batch, 3, img, img)
    return module.eval(), image


SIDES = ("reference", "fused", "fused_recompute")


def build_side(side: str, batch: int, img: int, model: str = "t2t"):
    """The module of one side and its input (the image needs no gradient, as in training)."""
    import t2t_fast
    from t2t_fast.models import FusedT2TModule

    module, image = build(batch, img, model)
    if side == "reference":
        return module, image
    if model == "t2t":
        module = FusedT2TModule(module)
        module.grad_checkpointing = side == "fused_recompute"
        return module, image
    fused = t2t_fast.create_model("t2t_vit_14", img_size=img).eval()
    fused.load_state_dict(module.state_dict())
    if side == "fused_recompute":
        fused.set_grad_checkpointing(True, "all")
    return fused, image


def run_side(side: str, batch: int, img: int, iters: int, threads: int, model: str = "t2t") -> dict:
    """Child process: time fwd+bwd of one side and measure its peak RSS growth."""
    import t2t_fast

    torch.set_num_threads(threads)
    module, image = build_side(side, batch, img, model)

    def step(x: torch.Tensor = image):
        with t2t_fast.backend("reference" if side == "reference" else "cpu"):
            module(x).square().mean().backward()

    # one pass on a single image first: lazy imports and one-time initialization (torch.utils.checkpoint pulls
    # in ~140 MB of modules) raise the RSS high-water mark, which is not the activation memory measured here
    step(image[:1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for i in range(iters + 1):
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        if i > 0:  # the first pass is a warm-up
            times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    saved = {}  # storages autograd keeps for the backward (after the measurement: it does not affect the peak)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"side": side, "median_s": statistics.median(times), "min_s": min(times),
            "peak_rss_growth_mb": (after - before) / 1024, "peak_rss_mb": after / 1024,
            "saved_for_backward_mb": sum(saved.values()) / 2**20, "iters": iters}


def check_same_function(img: int, threads: int, model: str = "t2t") -> float:
    """Max |fused - reference| of the output at batch 2 (1 for the whole model; a sanity check that both
    sides compute the same)."""
    import t2t_fast

    torch.set_num_threads(threads)
    batch = 2 if model == "t2t" else 1
    module, image = build(batch, img, model)
    with torch.no_grad():
        ref = module(image)
        with t2t_fast.backend("cpu"):
            fused = build_side("fused", batch, img, model)[0](image)
    return (fused - ref).abs().max().item() / ref.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="t2t",
                        help="the T2T module of t2t_vit_14 (default) or the whole t2t_vit_14")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed passes per round")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per side, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.batch, args.img, args.iters, args.threads, args.model)))
        return

    import t2t_fast

    if not t2t_fast.backends()["cpu"]:
        sys.exit(f"bench_cpu: the cpu backend is not available: {t2t_fast.backends()['cpu'].reason}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rounds = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in rounds:
            cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--batch", str(args.batch),
                   "--img", str(args.img), "--iters", str(args.iters), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_cpu: the {side} run failed:\n{out.stderr}")
            rounds[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rel_err = check_same_function(args.img, args.threads, args.model)

    results = {side: {"side": side, "median_s": statistics.median(r["median_s"] for r in runs),
                      "min_s": min(r["min_s"] for r in runs),
                      "peak_rss_growth_mb": statistics.median(r["peak_rss_growth_mb"] for r in runs),
                      "saved_for_backward_mb": runs[0]["saved_for_backward_mb"], "rounds": runs}
               for side, runs in rounds.items()}
    ref = results["reference"]
    what = "T2T module of t2t_vit_14 (performer)" if args.model == "t2t" else "t2t_vit_14 (whole model)"
    print(f"{what}, fp32, batch {args.batch}, {args.img} px, forward+backward, "
          f"{args.threads} CPU threads, torch {torch.__version__}; median of {args.rounds} alternating rounds of "
          f"{args.iters} passes")
    print(f"{'side':<16} {'median s':>9} {'min s':>7} {'peak RSS growth MB':>19} {'saved for backward MB':>22} "
          f"{'time x':>7} {'memory x':>9}")
    for r in results.values():
        print(f"{r['side']:<16} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['peak_rss_growth_mb']:>19.1f} "
              f"{r['saved_for_backward_mb']:>22.1f} {r['median_s'] / ref['median_s']:>7.2f} "
              f"{r['peak_rss_growth_mb'] / ref['peak_rss_growth_mb']:>9.2f}")
    print(f"targets against the reference: time <= x1.00, peak RSS growth <= x0.25; "
          f"max relative output difference {rel_err:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "img": args.img, "threads": args.threads,
                       "torch": torch.__version__, "results": results, "max_rel_output_diff": rel_err}, f, indent=2)


if __name__ == "__main__":
    main()
