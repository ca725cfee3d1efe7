"""Whole-model benchmark: T2T-ViT training step and inference, fused against reference, eager and compiled.

For each model, image size, dtype and batch it measures, for ``fused`` (``create_model(name)``: fused T2T
module + SDPA backbone, backend auto) and ``reference`` (``create_model(name, fused=False)``):

- ``train``: one optimizer step = forward + cross-entropy + backward + fused AdamW step, under bf16 autocast
  (``bf16``, fp32 weights) or in plain fp32 (``fp32``);
- ``infer``: a ``no_grad`` forward in eval mode;
- img/s from the median step time (``triton.testing.do_bench``: CUDA events, warm-up, L2 flushed), the input
  batch rotated among several pre-generated ones; a compiled row's ``compile_s`` is its first call; peak memory
  as the ``torch.cuda.max_memory_allocated`` delta of one step over what was allocated before it (weights,
  optimizer state and inputs excluded; ``peak_total_mib`` includes them);
- a roofline: the img/s the device's measured matmul rate allows for the model's FLOPs (counted once on the
  reference model with ``torch.utils.flop_counter``; a training step counts 3x the forward);
- ``max_batch``: the largest training batch that fits (doubling until out of memory, then bisection; capped in
  time, a capped search reports a lower bound).

``--quick`` is the subset ``benchmarks/gpu.sh`` runs: T2T-ViT-7/14/24 and T2T-ViT_t-14 at 224 px, B=128 and 64,
eager; T2T-ViT-14 at 384 px (B=64 and the largest batch), compiled at 224 px, and in fp32. ``--budget`` stops
starting measurements after that many seconds (gpu.sh's deadline); the jobs run in order of importance, so a
cut loses the least. ``--smoke`` is a tiny CPU run that checks the script works. Without CUDA (and without
``--smoke``) it says so and exits 0. Results are rewritten to ``--out`` after every measurement.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import t2t_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODELS = ("t2t_vit_7", "t2t_vit_14", "t2t_vit_24", "t2t_vit_t_14", "tnt_s_patch16_224")
IMPLS = ("reference", "fused")  # reference first: its FLOP count feeds the roofline of both
NUM_CLASSES = 1000
ROTATE = 3  # distinct input batches the timed steps cycle through
COMPILE_S = 60  # a compiled measurement is not started with less of the time budget left (compilation time)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Job:
    """Measurements on one model at one size and dtype, each run for both implementations."""

    model: str
    img: int
    dtype: str  # 'bf16' (autocast, fp32 weights) or 'fp32'
    batches: tuple[int, ...]
    kinds: tuple[str, ...] = ("train", "infer")
    modes: tuple[str, ...] = ("eager",)
    max_batch: bool = False  # also search the largest training batch (eager)
    overrides: dict = field(default_factory=dict)  # create_model kwargs (--smoke: a shallow model)


def plan(args: argparse.Namespace) -> list[Job]:
    """The jobs to run, most important first (a time budget cuts from the end)."""
    if args.smoke:
        shallow = dict(depth=2)
        return [Job("t2t_vit_7", 32, "bf16", (2,), max_batch=True, overrides=shallow),
                Job("t2t_vit_t_14", 32, "fp32", (2,), kinds=("train",), overrides=shallow),
                Job("tnt_s_patch16_224", 32, "fp32", (2,), kinds=("train",), overrides=shallow)]
    if args.quick:
        return [  # the targets' measurements first
            Job("t2t_vit_14", 224, "bf16", (128, 64)),
            Job("t2t_vit_14", 224, "bf16", (128,), kinds=("train",), modes=("compile",)),
            Job("t2t_vit_t_14", 224, "bf16", (128, 64)),
            Job("t2t_vit_14", 384, "bf16", (64,), max_batch=True),
            Job("t2t_vit_7", 224, "bf16", (128, 64)),
            Job("t2t_vit_24", 224, "bf16", (128, 64)),
            Job("t2t_vit_14", 224, "fp32", (64,), kinds=("train",)),
            Job("tnt_s_patch16_224", 224, "bf16", (128, 64)),
        ]
    jobs = []
    for img in args.sizes:
        for model in args.models:
            jobs.append(Job(model, img, "bf16", tuple(args.batches), modes=tuple(args.modes), max_batch=True))
    jobs += [Job(model, 224, "fp32", (64,), kinds=("train",)) for model in args.models]
    return jobs


# ---------------------------------------------------------------------------------------------------------
# One model: build, step functions, measurements
# ---------------------------------------------------------------------------------------------------------
class Bench:
    """A model of one implementation on the device, with its optimizer and step functions."""

    def __init__(self, job: Job, impl: str, device: torch.device):
        self.job, self.impl, self.device = job, impl, device
        self.model = t2t_fast.create_model(job.model, fused=impl == "fused", img_size=job.img,
                                           num_classes=NUM_CLASSES, **job.overrides).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=device.type == "cuda")
        self.compiled: Optional[torch.nn.Module] = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.job.dtype == "bf16")

    def net(self, mode: str) -> torch.nn.Module:
        if mode == "eager":
            return self.model
        if self.compiled is None:
            self.compiled = torch.compile(self.model)
        return self.compiled

    def inputs(self, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator(device=self.device).manual_seed(batch)
        return [(torch.randn(batch, 3, self.job.img, self.job.img, device=self.device, generator=g),
                 torch.randint(0, NUM_CLASSES, (batch,), device=self.device, generator=g)) for _ in range(count)]

    def step_fn(self, kind: str, mode: str) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
        net = self.net(mode)
        if kind == "train":
            self.model.train()

            def train(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
                x, y = batch
                with self.autocast():
                    loss = F.cross_entropy(net(x), y)
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            return train
        self.model.eval()

        def infer(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            with torch.no_grad(), self.autocast():
                net(batch[0])
        return infer

    def forward_flops(self) -> int:
        """FLOPs of one image's forward pass, counted on this model (exact for the reference's explicit math)."""
        from torch.utils.flop_counter import FlopCounterMode

        self.model.eval()
        x = torch.randn(1, 3, self.job.img, self.job.img, device=self.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model(x)
        return counter.get_total_flops()

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model = self.compiled = self.opt = None
        common.free_memory()


def measure(bench: Bench, kind: str, mode: str, batch: int, reps: int, warmup: int) -> dict:
    """Time and memory of one (kind, mode, batch) on a built model -> a result row's measurements."""
    data = bench.inputs(batch, ROTATE)
    fn = bench.step_fn(kind, mode)
    t0 = time.perf_counter()
    fn(data[0])  # first call: compiles (torch.compile, Triton JIT), allocates the optimizer state
    synchronize(bench.device)
    t1 = time.perf_counter()
    fn(data[1])
    synchronize(bench.device)
    est_ms = (time.perf_counter() - t1) * 1e3  # do_bench's warm-up and repetitions are in ms: ask for counts
    turn = itertools.cycle(data)
    ms = common.time_fn(lambda: fn(next(turn)), warmup=warmup * est_ms, rep=reps * est_ms)
    peak = common.peak_mem(lambda: fn(data[0]))
    row = dict(ms=ms, img_s=batch / (ms / 1e3), peak_mib=peak / 2**20 if peak is not None else None)
    if bench.device.type == "cuda":  # the absolute peak of that last call: weights, optimizer state, inputs too
        row["peak_total_mib"] = torch.cuda.max_memory_allocated(bench.device) / 2**20
    if mode == "compile":
        row["compile_s"] = round(t1 - t0, 2)
    return row


def largest_fit(fits: Callable[[int], bool], start: int, max_batch: int, cap_s: float) -> tuple[int, bool, int]:
    """Largest b <= max_batch with ``fits(b)``, by doubling from ``start`` then bisection (to ~1/64 of b).

    Returns (b, capped, tries): ``capped`` when the time cap or ``max_batch`` stopped the search, so b is
    only a lower bound. 0 when not even b=1 fits.
    """
    t0 = time.perf_counter()
    tries = 0
    lo, hi = 0, None  # lo fits (0: none known), hi does not (None: none known)
    b = max(1, min(start, max_batch))
    while True:
        if time.perf_counter() - t0 > cap_s:
            return lo, True, tries
        tries += 1
        if fits(b):
            lo = b
            if hi is None and b >= max_batch:
                return lo, True, tries
        else:
            hi = b
        if hi is None:
            b = min(2 * b, max_batch)
        elif lo == 0:
            if hi == 1:
                return 0, False, tries
            b = hi // 2
            if b <= lo:
                return lo, False, tries
        else:
            if hi - lo <= max(1, lo // 64):
                return lo, False, tries
            b = (lo + hi) // 2


def max_batch(bench: Bench, start: int, cap_s: float, limit: int) -> dict:
    """The largest eager training batch of ``bench`` that fits in device memory."""
    step = bench.step_fn("train", "eager")

    def fits(b: int) -> bool:
        try:
            step(bench.inputs(b, 1)[0])
            synchronize(bench.device)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False  # cleaned up below, outside the except block whose traceback holds the step's tensors
        bench.opt.zero_grad(set_to_none=True)
        common.free_memory()
        return ok

    t0 = time.perf_counter()
    b, capped, tries = largest_fit(fits, start, limit, cap_s)
    return dict(batch=b, capped=capped, tries=tries, search_s=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    name: str  # the device's name ('cpu' under --smoke)
    peaks: dict
    rows: list[dict] = field(default_factory=list)
    flops: dict = field(default_factory=dict)  # (model, img) -> forward FLOPs per image
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds of the time budget left (infinite without one)."""
        return float("inf") if self.args.budget is None else self.args.budget - (time.perf_counter() - self.t0)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        status = row.get("status", "ok")
        what = " ".join(str(row[k]) for k in ("model", "img", "dtype", "kind", "mode", "impl", "batch") if row[k])
        value = f"{row['img_s']:.1f} img/s" if "img_s" in row else f"B={row.get('max_batch')}" \
            if row["kind"] == "max_batch" and status == "ok" else ""
        print(f"  [{time.perf_counter() - self.t0:6.1f}s] {what}: {value} {status if status != 'ok' else ''}",
              flush=True)
        self.save()

    def save(self) -> None:
        if self.args.out:
            add_roofline(self.rows, self.flops, self.peaks)
            flops = {f"{m}@{i}": f for (m, i), f in self.flops.items()}
            common.write_results(self.args.out, "model", self.rows, meta=dict(
                device=self.name, peaks=self.peaks, quick=self.args.quick, smoke=self.args.smoke,
                torch=torch.__version__, flops_per_image=flops))

    def run_job(self, job: Job) -> None:
        for impl in IMPLS:
            base = dict(model=job.model, img=job.img, dtype=job.dtype, impl=impl)
            if self.left() <= 0:
                for kind, mode, batch in self.cases(job):
                    self.add(dict(base, kind=kind, mode=mode, batch=batch, status="skipped (time budget)"))
                continue
            try:
                bench = Bench(job, impl, self.device)
            except Exception as e:  # noqa: BLE001  (a failure is a result, the run goes on)
                for kind, mode, batch in self.cases(job):
                    self.add(dict(base, kind=kind, mode=mode, batch=batch, status=common.describe_error(e)))
                common.free_memory()
                continue
            try:
                if impl == "reference" and (job.model, job.img) not in self.flops:
                    self.count_flops(bench)
                for kind, mode, batch in self.cases(job):
                    if kind == "max_batch":
                        self.run_max_batch(bench, base, job)
                    else:
                        self.run_case(bench, base, kind, mode, batch)
            finally:
                bench.close()

    def count_flops(self, bench: Bench) -> None:
        try:
            self.flops[(bench.job.model, bench.job.img)] = bench.forward_flops()
        except Exception as e:  # noqa: BLE001  (no roofline for this model then)
            print(f"  FLOP count of {bench.job.model} at {bench.job.img} px failed: {common.describe_error(e)}")
        common.free_memory()

    @staticmethod
    def cases(job: Job) -> list[tuple[str, str, Optional[int]]]:
        cases = [(kind, mode, batch) for mode in job.modes for batch in job.batches for kind in job.kinds]
        return cases + ([("max_batch", "eager", None)] if job.max_batch else [])

    def run_case(self, bench: Bench, base: dict, kind: str, mode: str, batch: int) -> None:
        row = dict(base, kind=kind, mode=mode, batch=batch)
        if self.left() <= (COMPILE_S if mode == "compile" else 0):
            self.add(dict(row, status="skipped (time budget)"))
            return
        try:
            row.update(measure(bench, kind, mode, batch, self.args.reps, self.args.warmup), status="ok")
        except Exception as e:  # noqa: BLE001
            row["status"] = common.describe_error(e)
        bench.opt.zero_grad(set_to_none=True)
        common.free_memory()
        self.add(row)

    def run_max_batch(self, bench: Bench, base: dict, job: Job) -> None:
        row = dict(base, kind="max_batch", mode="eager", batch=None)
        cap = min(self.args.max_batch_seconds, self.left())
        if cap < 10:
            self.add(dict(row, status="skipped (time budget)"))
            return
        try:
            found = max_batch(bench, max(job.batches), cap, self.args.max_batch_limit)
            row.update(max_batch=found.pop("batch"), **found, status="ok")
        except Exception as e:  # noqa: BLE001
            row["status"] = common.describe_error(e)
        common.free_memory()
        self.add(row)


def add_roofline(rows: list[dict], flops: dict, peaks: dict) -> None:
    """Fill ``roofline_img_s`` (matmul-rate bound for the model's FLOPs) and ``roofline_pct`` of timed rows."""
    for row in rows:
        f = flops.get((row["model"], row["img"]))
        rate = peaks.get(f"matmul_tflops_{row['dtype']}")
        if not f or not rate or "img_s" not in row:
            continue
        per_image = f * (3 if row["kind"] == "train" else 1)
        row["gflop_per_img"] = round(per_image / 1e9, 2)
        row["roofline_img_s"] = rate * 1e12 / per_image
        row["roofline_pct"] = 100 * row["img_s"] / row["roofline_img_s"]


def tables(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, rows) of the comparison tables: timings with fused/reference ratios, and largest batches."""
    ref = {(r["model"], r["img"], r["dtype"], r["kind"], r["mode"], r["batch"]): r for r in rows
           if r["impl"] == "reference" and r.get("status") == "ok"}
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    timed = []
    for r in rows:
        if r["kind"] == "max_batch":
            continue
        key = (r["model"], r["img"], r["dtype"], r["kind"])
        fused = r["impl"] == "fused" and r.get("status") == "ok"
        base, base_eager = ref.get(key + (r["mode"], r["batch"]), {}), ref.get(key + ("eager", r["batch"]), {})
        timed.append(dict(
            model=r["model"], px=r["img"], dtype=r["dtype"], B=r["batch"], kind=r["kind"], mode=r["mode"],
            impl=r["impl"], ms=r.get("ms"), img_s=r.get("img_s"),
            speedup=ratio(r.get("img_s"), base.get("img_s")) if fused else None,
            vs_ref_eager=ratio(r.get("img_s"), base_eager.get("img_s")) if fused and r["mode"] != "eager" else None,
            peak_mib=r.get("peak_mib"),
            mem_ratio=ratio(r.get("peak_mib"), base.get("peak_mib")) if fused else None,
            roofline_pct=r.get("roofline_pct"), compile_s=r.get("compile_s"), status=r.get("status")))
    out = [("T2T-ViT training step and inference (speedup: fused / reference img/s in the same mode; "
            "mem_ratio: fused / reference peak)", timed)]
    by_case: dict = {}
    for r in rows:
        if r["kind"] == "max_batch":
            by_case.setdefault((r["model"], r["img"], r["dtype"]), {})[r["impl"]] = r
    largest = []
    for (model, img, dtype), by_impl in by_case.items():
        f, rf = by_impl.get("fused", {}), by_impl.get("reference", {})
        notes = [f"{impl}: {r.get('status')}" for impl, r in by_impl.items() if r.get("status") != "ok"]
        notes += [f"{impl}: search stopped by its time cap or size limit, a lower bound" for impl, r in by_impl.items()
                  if r.get("capped")]
        largest.append(dict(model=model, px=img, dtype=dtype, fused=f.get("max_batch"), reference=rf.get("max_batch"),
                            ratio=ratio(f.get("max_batch"), rf.get("max_batch")), note="; ".join(notes)))
    if largest:
        out.append(("Largest training batch that fits (eager)", largest))
    return out


def report(rows: list[dict]) -> None:
    for title, table in tables(rows):
        common.print_table(title, table)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for model.csv and model.json (rewritten after every measurement)")
    p.add_argument("--quick", action="store_true", help="the subset benchmarks/gpu.sh runs")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script (no numbers)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=t2t_fast.list_models())
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 128])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--reps", type=int, default=None, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: measurements not started by then are recorded as skipped")
    p.add_argument("--max-batch-seconds", type=float, default=None, help="time cap of one largest-batch search")
    p.add_argument("--max-batch-limit", type=int, default=16384, help="largest batch the search tries")
    args = p.parse_args(argv)
    quick_or_smoke = args.quick or args.smoke
    args.reps = args.reps or (2 if args.smoke else 20 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3 if args.quick else 5)
    args.max_batch_seconds = args.max_batch_seconds or (40.0 if quick_or_smoke else 180.0)
    if args.smoke:
        args.max_batch_limit = min(args.max_batch_limit, 4)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()  # --budget counts from here
    args = parse_args(argv)
    device = common.bench_device("bench_model", args.smoke)
    if device is None:
        return 0
    peaks = common.roofline_peaks(device)
    name = common.device_name(device)
    print(f"bench_model on {name}; {common.describe_peaks(peaks)}", flush=True)
    run = Run(args, device, name, peaks, t0=start)
    for job in plan(args):
        run.run_job(job)
    run.save()
    add_roofline(run.rows, run.flops, peaks)
    report(run.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
