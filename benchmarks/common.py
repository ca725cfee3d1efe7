"""Small, generic helpers shared by the benchmarks: timing, memory, copy bandwidth, tables and result files.

Timings are medians in milliseconds (``triton.testing.do_bench`` on CUDA: warm-up, L2 flushed between calls;
a ``perf_counter`` loop on CPU). Memory is measured with the CUDA caching allocator's counters (None on CPU).
"""
from __future__ import annotations

import csv
import gc
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()


def time_fn(fn: Callable[[], object], warmup: float = 25, rep: float = 100,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median milliseconds of one ``fn()`` call. ``warmup``/``rep``: milliseconds of warm-up and measurement
    (as ``do_bench``); ``grad_to_none``: tensors whose ``.grad`` is reset before every call."""
    if _cuda():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    deadline = time.perf_counter() + rep / 1e3
    fn()  # warm-up (compilation, caches)
    while not times or (time.perf_counter() < deadline and len(times) < 100):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_mem(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated during one ``fn()`` call beyond what was allocated before it (None on CPU)."""
    if not _cuda():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def held_mem(fn: Callable[[], object]) -> Optional[int]:
    """Bytes ``fn()`` leaves allocated while its result is alive, the result's own tensor storage excluded
    (for a forward with autograd: what it saved for the backward). None on CPU."""
    if not _cuda():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    if isinstance(out, torch.Tensor):
        held -= out.untyped_storage().nbytes()
    del out
    return held


def copy_bandwidth(device: torch.device, nbytes: int = 2**28) -> Optional[float]:
    """GB/s of a device-to-device tensor copy (bytes read + written over time), timed as ``time_fn``."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks, so one measurement does not bias the next."""
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "/")


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """``rows`` as a markdown table (columns: the union of the rows' keys by default)."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, rows: list[dict], columns: Optional[list[str]] = None) -> None:
    """Print ``rows`` as a markdown table under ``title`` (columns: the union of the rows' keys by default)."""
    print(f"\n### {title}\n")
    print(markdown_table(rows, columns), flush=True)


def write_results(out: str, name: str, rows: list[dict], meta: Optional[dict] = None) -> None:
    """Write ``out/<name>.csv`` (one line per row) and ``out/<name>.json`` (``{"meta": ..., "rows": ...}``)."""
    os.makedirs(out, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=1, default=str)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> Optional[float]:
    """Dense (n x n) @ (n x n) matmul rate in TFLOPS, timed as ``time_fn`` (None on CPU): a roofline's
    compute bound. fp32 follows ``torch.backends.cuda.matmul.allow_tf32`` as the benchmarks run it."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def describe_error(e: BaseException) -> str:
    """A result row's status for a failed measurement: 'out of memory', or the error's type and first line."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def roofline_peaks(device: torch.device) -> dict:
    """The device's measured copy bandwidth (GB/s) and bf16/fp32 matmul rates (TFLOPS); Nones on CPU."""
    return dict(copy_gbps=copy_bandwidth(device), matmul_tflops_bf16=matmul_tflops(device, torch.bfloat16),
                matmul_tflops_fp32=matmul_tflops(device, torch.float32))


def bench_device(script: str, smoke: bool) -> Optional[torch.device]:
    """The device a benchmark runs on: the current CUDA device; the CPU for ``--smoke`` (Triton's interpreter
    switched on, which must happen before triton is imported); None, after saying so, when neither applies."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    print(f"{script}: no CUDA device; nothing measured (use --smoke for a CPU check of the script)")
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
