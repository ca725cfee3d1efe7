"""Small, generic helpers shared by the benchmarks: timing, memory, copy bandwidth, tables, result files and the
loop that measures a list of cases.

Timings are medians in milliseconds (``triton.testing.do_bench`` on CUDA: warm-up, L2 flushed between calls;
a ``perf_counter`` loop on CPU); the op benchmarks time CUDA-graph replays too (``graph_time``: GPU time without
the host's launch cost). Memory is measured with the CUDA caching allocator's counters (None on CPU).
"""
from __future__ import annotations

import csv
import gc
import json
import os
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()


def time_fn(fn: Callable[[], object], warmup: float = 25, rep: float = 100,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median milliseconds of one ``fn()`` call. ``warmup``/``rep``: milliseconds of warm-up and measurement
    (as ``do_bench``; off the GPU, 0 skips the warm-up call); ``grad_to_none``: tensors whose ``.grad`` is reset
    before every call."""
    if _cuda():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    deadline = time.perf_counter() + rep / 1e3
    if warmup > 0:
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


def graph_time(fn: Callable[[], object], warmup: float = 25, rep: float = 100,
               grads_of: Optional[Sequence[torch.Tensor]] = None) -> tuple[Optional[float], Optional[str]]:
    """(median milliseconds of ``fn()`` replayed from a CUDA graph, None), or (None, why it could not be
    captured); (None, "no CUDA") on CPU. The GPU time of the work without the host's per-launch cost (on a
    machine where launches cost more host time than small kernels take, eager timings measure the host).
    ``grads_of``: leaves whose ``.grad`` the call writes (reset before the capture; the graph then owns them)."""
    if not _cuda():
        return None, "no CUDA"
    import triton.testing

    def reset() -> None:
        for t in grads_of or ():
            t.grad = None

    graph = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(2):
                reset()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")), None
    except Exception as e:  # noqa: BLE001 - a call that cannot be captured keeps its eager timing
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None, describe_error(e)
    finally:
        reset()
        del graph
        free_memory()


def measure_row(call: Callable[[], object], forward: Optional[Callable[[], object]] = None, warmup: float = 25,
                rep: float = 100, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                timed: Optional[Callable[[], object]] = None, graph: bool = True) -> dict:
    """A result row's time and memory fields for one measured ``call``.

    ``eager_ms``: ``time_fn`` of ``timed`` (``call`` by default) with ``warmup``, ``rep`` and ``grad_to_none``:
    one call after another, host overhead included. ``graph_ms`` (with ``graph``, on CUDA): ``call`` replayed
    from a CUDA graph (``graph_time``), the GPU time alone; ``graph_note`` says why it is missing. ``ms`` is
    ``graph_ms`` when there is one, else ``eager_ms``, and ``timing`` says which. ``peak_mib``
    (``peak_mem(call)``) and, given ``forward`` (the forward of a forward + backward ``call``), ``act_mib``
    (``held_mem(forward)``). Memory fields are None on CPU."""
    mib = lambda b: b / 2**20 if b is not None else None  # noqa: E731
    eager = time_fn(timed or call, warmup=warmup, rep=rep, grad_to_none=grad_to_none)
    row = dict(ms=eager, timing="eager", eager_ms=eager, peak_mib=mib(peak_mem(call)))
    if forward is not None:
        row["act_mib"] = mib(held_mem(forward))
    if graph:
        ms, why = graph_time(call, warmup=warmup, rep=rep, grads_of=grad_to_none)
        row["graph_ms"] = ms
        if ms is not None:
            row["ms"], row["timing"] = ms, "graph"
        elif _cuda():
            row["graph_note"] = why
    return row


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


def describe_peaks(peaks: dict) -> str:
    """``roofline_peaks`` as one line for a benchmark's header ('no roofline on CPU' when not measured)."""
    if peaks["copy_gbps"] is None:
        return "no roofline on CPU"
    return (f"copy {peaks['copy_gbps']:.0f} GB/s, matmul {peaks['matmul_tflops_bf16']:.0f} TFLOPS bf16, "
            f"{peaks['matmul_tflops_fp32']:.0f} TFLOPS fp32")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or None when ``a`` is missing or ``b`` missing or zero."""
    return a / b if a is not None and b else None


def speedup(base: dict, fused: dict) -> Optional[float]:
    """base time / fused time of two result rows, both CUDA-graph times when both have one, else both eager
    (never one of each)."""
    if base.get("graph_ms") and fused.get("graph_ms"):
        return ratio(base["graph_ms"], fused["graph_ms"])
    return ratio(base.get("eager_ms", base.get("ms")), fused.get("eager_ms", fused.get("ms")))


NOT_JUDGED = "not judged (CPU smoke run)"


def target(value: Optional[float], goal: float, at_most: bool = False, strict: bool = False) -> str:
    """'pass' or 'miss' of ``value`` against ``goal`` (``>= goal``; ``<=`` with ``at_most``; ``strict``: ``>``),
    'n/a' when there is no value."""
    if value is None:
        return "n/a"
    met = value <= goal if at_most else value > goal if strict else value >= goal
    return "pass" if met else "miss"


def run_cases(columns: Sequence[str], cases: Iterable[tuple], measure: Callable[..., dict], label: str,
              out: Optional[str], name: str, meta: dict) -> list[dict]:
    """Measure every case in turn; the result rows, one per case.

    A case is a tuple of values for ``columns``; its row is those fields, then what ``measure(*case)``
    returns (``ms`` among it), then ``status``: 'ok', or ``describe_error`` of what ``measure`` raised (a
    failure, out of memory included, is a result: the run goes on). After each case memory is freed, the line
    ``  <label>: <ms> ms`` (or the status) is printed, ``label`` formatted with the row's fields, and with
    ``out`` the rows so far are rewritten to ``out/<name>.{csv,json}`` (a run cut short keeps what it measured).
    """
    rows: list[dict] = []
    for case in cases:
        row = dict(zip(columns, case))
        try:
            row.update(measure(*case))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            row["status"] = describe_error(e)
        free_memory()
        rows.append(row)
        print(f"  {label.format(**row)}: " + (f"{row['ms']:.3f} ms" if row["status"] == "ok" else row["status"]),
              flush=True)
        if out:
            write_results(out, name, rows, meta=meta)
    return rows


def report_targets(name: str, op: str, title: str, rows: list[dict], table: list[dict], out: Optional[str],
                   meta: dict) -> None:
    """Print the measurements (titled '<op>: measurements') and the targets' ``table`` (under ``title``); with
    ``out``, write ``out/<name>.{csv,json}`` (the summary also in the json's meta) and
    ``out/<name>_summary.{csv,json}``. On the CPU (a ``--smoke`` run: interpreter times) every ``*_target``
    verdict becomes ``NOT_JUDGED``."""
    if meta.get("device") == "cpu":
        table = [{k: NOT_JUDGED if k.endswith("_target") else v for k, v in line.items()} for line in table]
    print_table(f"{op}: measurements", rows)
    print_table(title, table)
    if out:
        write_results(out, name, rows, meta=dict(meta, summary=table))
        write_results(out, f"{name}_summary", table, meta=meta)


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
