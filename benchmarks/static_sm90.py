"""Static sm_90 performance model of the fused ops: a prediction from compiled code, never a measurement.

Without a GPU, every Triton kernel launch that the kernels' own host code makes
(``t2t_fast.kernels.soft_split.forward/backward``, ``t2t_fast.kernels.performer.forward/backward``) at the
T2T-ViT-14 shapes (B=64, bf16) is compiled for Hopper (``GPUTarget("cuda", 90, 32)``) through a fake Triton
driver that turns each launch into a compile-only warm-up, with its real grid, scalar arguments and constexprs.
Triton's bundled ``cuobjdump`` gives each cubin's registers and SASS; the SASS is counted per loop:

    python benchmarks/static_sm90.py [--op soft_split|performer] [--case CASE ...] [--quick] [--json PATH]
    python benchmarks/static_sm90.py --calibrate kernel_times.json   # the model against a GPU run's kernel times
                                                                     # (or benchmarks/results/<device>.md)

It prints a markdown page (``benchmarks/results/static-sm90.md`` is its output at the commit named there).

The model, per kernel launch (every number below is a prediction; all but occupancy_us, which is fitted to
measured times, are lower bounds on time):

- warp_instructions = warps x (programs x instructions outside loops + sum over loops of the loop body's
  instructions x its executions). A loop's executions are the iterations summed over all programs (and over the
  iterations of the loops around it), from the kernel's own loop bounds at the launch's arguments (``TRIPS``
  below). Loops are the backward branches of the SASS; a nested loop's instructions count in the inner loop
  only. One execution of a loop body (or of the code outside loops) counts the instructions on its longest path:
  each forward branch (an interior/border if/else, a zero-trip skip, a guarded EXIT) is taken to its costlier
  side, since one execution runs one side; where the region has a divergent branch (``BSSY``, both sides may run
  in one warp) every instruction counts. Predicated-off instructions issue, and a subroutine (``CALL``, e.g. a
  division slow path) counts at every call site. Software-pipelining prologue and epilogue copies are outside
  the loop and count once per program. All of this errs against the fused kernel (more instructions, never
  fewer).
- issue_floor_us = warp_instructions / (SMS x ISSUE_PER_CLOCK x CLOCK_HZ): an SM issues at most one
  warp-instruction per clock on each of its 4 sub-partitions.
- min_bytes: the memory of the launch's tensor arguments, each distinct element counted once (an argument that
  aliases another, such as a dummy pointer passed for an unused one, adds nothing): every input read once and
  every output written once. touched_bytes: what the global loads, stores and atomics execute, each executed
  warp-instruction x 32 lanes x its access width: an upper bound that counts re-reads (L2 hits included).
- tc_flops: the tensor-core FLOPs of the executed HMMA/HGMMA instructions, 2 m n k per instruction from the
  shape in its mnemonic; HGMMA is a warpgroup instruction, counted once per 4 warps.
- roofline_us = max(min_bytes / HBM_BYTES_PER_S, sum of tc_flops / the tensor-core rate of their type);
  predicted_us = max(occupancy_us, roofline_us, KERNEL_FLOOR_S): no launch is shorter than the floor.
- ctas_per_sm: the resident blocks allowed by registers (REGS_PER_SM, allocated per warp in units of
  REG_ALLOC_UNIT, each of the 4 sub-partitions holding whole warps), shared memory (SMEM_PER_SM per SM, at most
  SMEM_PER_BLOCK per block, SMEM_RESERVED_PER_BLOCK reserved per block, SMEM_ALLOC_UNIT granularity) and warps
  (MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM).
- occupancy_us: the same instructions at the rate the resident warps sustain, with whole waves. A warp waits
  on its loads, MMAs and dependent arithmetic most of the time, so an SM with few warps issues far below 4 per
  clock: resident = min(ctas_per_sm, cdiv(programs, SMS)) blocks per SM, waves = cdiv(programs, SMS x
  resident), SM rate = min(ISSUE_PER_CLOCK, resident x warps x WARP_IPC), and occupancy_us = waves x resident x
  (warp_instructions / programs) / SM rate / CLOCK_HZ (>= issue_floor_us). WARP_IPC is calibrated, not
  derived: see its definition for the H200 measurements it comes from and how well it fits them.
- Eager PyTorch ops in the host code (partial-sum reductions, copies) are captured with a dispatch mode and
  count at their memory roofline (their bytes read and written), optimistic for the fused side.

What it leaves out: which stalls a kernel has (one calibrated rate per warp stands for all of them: a change
that hides latency without removing instructions, such as prefetching, earns nothing here), L2 behaviour,
clocks, launch overheads, achieved (not peak) HBM bandwidth. mma.sync (HMMA) is counted at the same
tensor-core rate as wgmma (HGMMA), which it is not known to reach. Only a GPU run measures time; when one
exists, it overrules this, and ``benchmarks/kernel_times.py`` gives the per-kernel times to recalibrate
WARP_IPC against: ``--calibrate kernel_times.json``, run at the commit that was measured, prints the model
against them and the best-fitting value.

The reference (``kernel: "reference"`` rows) is ``t2t_fast/reference.py`` itself, run on meta tensors under an
emulation of CUDA autocast to bf16 (``_Autocast``: matmul/linear/mm/bmm in bf16, layer_norm/exp in fp32, sum
with an fp32 result), forward and backward, every aten op recorded. Each eager kernel is put at its own memory
and tensor-core roofline (bytes read + written at HBM bandwidth, matmul FLOPs at the tensor-core rate): views are
free, every other op reads each input and writes each output once; the copies that CUDA kernels make
internally (``contiguous()`` of a strided input of im2col, col2im and the LayerNorm) are added, and the
LayerNorm backward is two kernels (input gradient; gamma and beta gradients) as in PyTorch's CUDA code. No
eager kernel is charged an instruction or launch cost: optimistic for the reference, so the predicted speedup
errs against the fused kernels. The gradient of a token input stops at the op's own input (the view that
feeds it), on both sides. ``no_autocast_us`` is the same reference run on the bf16 tensors without autocast (the
soft split's LayerNorm parameters in bf16), as ``bench_soft_split.py`` and ``bench_performer.py`` time it: fewer
casts, so a smaller predicted speedup. The input and weight casts that autocast adds in front of both paths in
the model (fp32 parameters to bf16) are left out of both.

Cases (B=64, bf16, T2T-ViT-14): soft split stage 1 (x (64, 3, 224, 224), k7 s4 p2, LayerNorm(147) + Linear(147,
192), backward without grad_x), stage 2 ((64, 3136, 64) tokens viewed as (64, 64, 56, 56), k3 s2 p1,
LayerNorm(576) + Linear(576, 192)), final ((64, 784, 64) tokens as 64x28x28 -> Linear(576, 384) with bias, no
LayerNorm), stage 1 at 384 px; performer B=64, H=1, T=3136 and 9216, d=64, m=32, q/k/v views of one
(B, T, 192) projection.

Adding or changing a kernel
---------------------------
1. ``TRIPS`` (below): one entry per ``@triton.jit`` kernel name, a function of the launch (``Launch``: grid,
   named scalar arguments and constexprs) returning, for every loop of the kernel's SASS in address order (an
   outer loop before the loops inside it), its executions summed over all programs. The tool compares the count
   with the loops it finds in the SASS and stops with an error on a mismatch, so a kernel change cannot silently
   break the model: update the entry with the kernel. A kernel without an entry is an error too.
2. ``sm90_host()`` holds every patch that lets the host code compile CPU tensors as if they were on an sm_90
   GPU. Kernel authors: keep the names it lists, or update the list.
3. New cases: ``SOFT_SPLIT_CASES`` / ``PERFORMER_CASES``.
4. ``--sass DIR`` writes every launch's SASS, to see the loops the tool finds. A loop that ptxas unrolls by
   itself (a short body with a runtime trip count) shows up as two loops, the unrolled one and a remainder
   (see ``_pf_combine``). Where ptxas versions differ in that (triton 3.6 and 3.9 bundle different ones), the
   entry returns one list per loop count, ``{loops: [trips, ...]}``, and the SASS picks.
Kernels must launch through ``kernel[grid](...)`` (no autotuner: it would try to time them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
import triton
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from t2t_fast.runtime import cdiv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------
# Constants: H100 SXM / H200 (sm_90, 132 SMs), dense tensor-core rates
# ----------------------------------------------------------------------------------------------------------
SMS = 132
ISSUE_PER_CLOCK = 4  # warp-instructions per SM per clock: one per sub-partition
CLOCK_HZ = 1.98e9  # boost clock
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 (an H200 has 4.8 TB/s: memory-bound kernels would be faster there)
TC_FLOPS_PER_S = {"bf16": 990e12, "f16": 990e12, "tf32": 495e12, "fp8": 1979e12, "fp32": 67e12}
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128
# Warp-instructions one resident warp issues per clock on average (occupancy_us). Calibrated on the H200 (run
# at commit e4dd2db: benchmarks/kernel_times.py, torch.profiler device time per launch; `--calibrate`
# refits it): its 22 soft-split kernels at 4-16 resident warps per SM fit best at 0.146; at 0.14 each is within
# 0.49x-2.2x of its measured time and every case's forward or backward total within 0.68x-1.16x (the issue
# floor alone, at 4 per clock, was 1.1x-700x below). The performer's kernels sit at their memory roofline
# either way (measured 1.0x-1.45x above it).
WARP_IPC = 0.14
# The shortest time a launch takes: on the same run the smallest kernels (a few KB moved, about 1 us modelled)
# measured 2.8-3.6 us.
KERNEL_FLOOR_S = 2.5e-6
B = 64
DTYPE = torch.bfloat16
CONSTANTS = dict(sms=SMS, issue_per_clock=ISSUE_PER_CLOCK, warp_ipc=WARP_IPC, kernel_floor_s=KERNEL_FLOOR_S,
                 clock_hz=CLOCK_HZ, hbm_bytes_per_s=HBM_BYTES_PER_S, tc_flops_per_s=TC_FLOPS_PER_S,
                 regs_per_sm=REGS_PER_SM, reg_alloc_unit=REG_ALLOC_UNIT, max_warps_per_sm=MAX_WARPS_PER_SM,
                 max_blocks_per_sm=MAX_BLOCKS_PER_SM, smem_per_sm=SMEM_PER_SM, smem_per_block=SMEM_PER_BLOCK,
                 smem_reserved_per_block=SMEM_RESERVED_PER_BLOCK)


# ----------------------------------------------------------------------------------------------------------
# One compiled launch
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """A kernel launch as the host code made it: grid, arguments by name (tensors, scalars, constexprs)."""

    kernel: str
    grid: tuple[int, int, int]
    args: dict[str, Any]
    warps: int
    stages: int
    shared: int
    cubin: bytes

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


# ----------------------------------------------------------------------------------------------------------
# Trip counts: kernel name -> launch -> executions of each SASS loop (address order, outer before inner),
# summed over all programs. Mirror each kernel's `for` loops at its launch arguments.
# ----------------------------------------------------------------------------------------------------------
# one count per loop; or, where ptxas versions unroll a loop differently, one such list per number of loops the SASS
# can have
Trips = list[int] | dict[int, list[int]]


def _ss_interior(a: Launch) -> int:
    """Token tiles of the launch whose patches all lie inside the image (the unmasked path), as ``_tile``."""
    th, tw, sh, sw, ph, pw = a["TH"], a["TW"], a["SH"], a["SW"], a["PH"], a["PW"]
    tiles_h = a["TPI"] // a["TILES_W"]
    rows = sum(1 for r in range(tiles_h) if r * th * sh >= ph and ((r + 1) * th - 1) * sh - ph + a["KH"] <= a["H"]
               and (r + 1) * th <= a["LH"])
    cols = sum(1 for c in range(a["TILES_W"]) if c * tw * sw >= pw
               and ((c + 1) * tw - 1) * sw - pw + a["KW"] <= a["W"] and (c + 1) * tw <= a["LW"])
    return rows * cols


def _ss_forward(a: Launch) -> list[int]:
    # program (token tile, column group): for kc in range(NUM_CHUNKS), every gather masked
    return [a.programs * a["NUM_CHUNKS"]]


def _ss_stats(a: Launch) -> list[int]:
    # program (token tile): if interior: for kc in range(NUM_CHUNKS) (unmasked gathers), else the same loop with
    # masks (the only one for LINEAR tiles)
    if a["LINEAR"]:
        return [a.programs * a["NUM_CHUNKS"]]
    inner = a.grid[0] // a["TPI"] * _ss_interior(a)
    return [inner * a["NUM_CHUNKS"], (a.programs - inner) * a["NUM_CHUNKS"]]


def _ss_backward_weight(a: Launch) -> list[int]:
    # program (group g, chunk; column group on axis 1): with INNER for i in range(g, NUM_INNER, G) (interior
    # tiles), then for i in range(g, NUM_BORDER, G) (the only loop without INNER)
    return [a["NKB"] * a.grid[1] * sum(len(range(g, a[n], a["G"])) for g in range(a["G"]))
            for n in (("NUM_INNER", "NUM_BORDER") if a["INNER"] else ("NUM_BORDER",))] \
        + [a.grid[1] * cdiv(a["M"], a["TH"] * a["TW"])]


def _ss_backward_finish(a: Launch) -> list[int]:
    # for g0 in range(0, G, GB) (G == 1 is specialized away)
    return [a.programs * cdiv(a["G"], a["GB"])] if a["G"] > 1 else []


def _ss_backward_stats(a: Launch) -> list[int]:
    # for n0 in range(0, N, BN)
    return [a.programs * cdiv(a["N"], a["BN"])]


def _ss_backward_input(a: Launch) -> list[int]:
    # program (pixel block + NUM_P * (image * stride residue), channel block):
    # for a in range((KH - ti + SH - 1) // SH): for e in range((KW - tj + SW - 1) // SW): for n0 in range(0, N, BN)
    sh, sw, ph, pw = a["SH"], a["SW"], a["PH"], a["PW"]
    n_blocks = len(range(0, a["N"], a["BN"]))
    outer = middle = 0
    for pid_r in range(a.grid[0] // a["NUM_P"]):
        rh, rw = (pid_r // sw) % sh, pid_r % sw
        na = max(0, (a["KH"] - (rh + ph) % sh + sh - 1) // sh)
        ne = max(0, (a["KW"] - (rw + pw) % sw + sw - 1) // sw)
        outer += na
        middle += na * ne
    per = a["NUM_P"] * a.grid[1]
    # the n0 loop's constant trip count (N and BN constexprs) lets ptxas unroll it: then two loops
    return {3: [per * outer, per * middle, per * middle * n_blocks], 2: [per * outer, per * middle]}


def _pf_tiles(a: Launch) -> list[int]:
    # for i in range(n_tiles), n_tiles = min(tiles_per_chunk, cdiv(T - t_start, BLOCK_T)) of the program's chunk
    T, bt, nc, tpc = a["T"], a["BLOCK_T"], a["n_chunks"], a["tiles_per_chunk"]
    per_bh = sum(max(0, min(tpc, cdiv(T - c * tpc * bt, bt))) for c in range(nc))
    return [a.programs // nc * per_bh]


def _pf_combine(a: Launch) -> Trips:
    # SHIFTED: for c in range(1, n_chunks) (max), then for c in range(n_chunks) (sum); else the sum loop only.
    # ptxas unrolls the sum loop 4x: a 4x loop, a 2x block (outside loops, counted once), a 1x remainder loop
    # (counted n_chunks % 4 times, an upper bound). triton 3.6's ptxas unrolls the max loop the same way.
    nc, p = a["n_chunks"], a.programs
    total = [p * (nc // 4), p * (nc % 4)]
    if not a["SHIFTED"]:
        return total
    return {3: [p * (nc - 1)] + total, 4: [p * ((nc - 1) // 4), p * ((nc - 1) % 4)] + total}


TRIPS: dict[str, Callable[[Launch], Trips]] = {
    # soft split (kernels/soft_split.py)
    "_prepare_kernel": lambda a: [],
    "_stats_kernel": _ss_stats,
    "_forward_kernel": _ss_forward,
    "_backward_weight_kernel": _ss_backward_weight,
    "_backward_finish_kernel": _ss_backward_finish,
    "_backward_stats_kernel": _ss_backward_stats,
    "_backward_input_kernel": _ss_backward_input,
    # performer (kernels/performer.py)
    "_kv_partial_kernel": _pf_tiles,
    "_combine_kernel": _pf_combine,
    "_attend_kernel": _pf_tiles,
    "_query_grad_kernel": _pf_tiles,
    "_key_grad_kernel": _pf_tiles,
}


# ----------------------------------------------------------------------------------------------------------
# Patch points: the ONLY place where the tool reaches into the kernels' host code.
# ----------------------------------------------------------------------------------------------------------
class _OnSm90(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` with True, so host code takes its GPU path (GPU dot dtypes, grid
    sizes). Ops on it return _OnSm90 tensors too (torch's default subclass propagation)."""

    @property
    def is_cuda(self) -> bool:
        return True


def on_sm90(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_OnSm90)


@contextlib.contextmanager
def sm90_host() -> Iterator[None]:
    """Let the kernels' host code run on CPU tensors as if on an sm_90 GPU with SMS SMs.

    KERNEL AUTHORS: these are the names of the host code this tool relies on. Keep them, or update this list
    when you change them (``tests/test_static_sm90.py`` fails when one is missing):
    - inputs are ``_OnSm90`` tensors (``is_cuda`` is True); ``x.device`` is still the CPU
    - ``t2t_fast.kernels.soft_split._num_sms(index)``: the SM count (uses torch.cuda otherwise)
    - ``t2t_fast.kernels.performer._sm_count(device)``: the SM count (device.type == "cpu" otherwise)
    """
    import t2t_fast.kernels.performer as performer
    import t2t_fast.kernels.soft_split as soft_split

    patches = [(soft_split, "_num_sms", lambda index: SMS), (performer, "_sm_count", lambda device: SMS)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ----------------------------------------------------------------------------------------------------------
# Triton internals (private API, written for triton 3.6-3.9, run with 3.9): a compile-only driver for sm_90
# ----------------------------------------------------------------------------------------------------------
def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def tools_missing() -> Optional[str]:
    """None when Triton's bundled ptxas and cuobjdump exist, else what is missing."""
    missing = [t for t in ("ptxas", "cuobjdump") if not os.access(_bin(t), os.X_OK)]
    return f"triton's bundled {' and '.join(missing)} not found under {os.path.dirname(_bin('x'))}" \
        if missing else None


class _Sm90Driver:
    """Stands in for Triton's CUDA driver: target sm_90, device 0, stream 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


@contextlib.contextmanager
def compile_only(record: list) -> Iterator[None]:
    """Every ``kernel[grid](...)`` launch compiles for sm_90 and appends a ``Launch`` to ``record``; nothing
    runs."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("static_sm90 compiles kernels: run it in a process without TRITON_INTERPRET=1 (the "
                           "kernels must be decorated as compiled JIT functions)")
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        params = inspect.signature(self.fn).parameters
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        named = dict(bound.arguments)
        g = grid(named) if callable(grid) else grid
        g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
        md = compiled.metadata
        record.append(Launch(self.fn.__name__, g, named, md.num_warps, md.num_stages, md.shared,
                             compiled.asm["cubin"]))
        return compiled

    saved = driver._active
    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original_run
        driver._active = saved


# ----------------------------------------------------------------------------------------------------------
# SASS: instructions, loops, counts
# ----------------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P(?:T|\d)\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")
MIX = ("mma", "ldg", "stg", "lds", "sts", "mufu", "bar", "shfl", "int", "fp", "spill", "other")
_KIND = {
    **dict.fromkeys(("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "DMMA"), "mma"),
    **dict.fromkeys(("LDG", "LDGSTS"), "ldg"),
    **dict.fromkeys(("STG", "ATOM", "ATOMG", "RED", "REDG"), "stg"),
    **dict.fromkeys(("LDS", "LDSM"), "lds"),
    **dict.fromkeys(("STS", "STSM"), "sts"),
    "MUFU": "mufu",
    **dict.fromkeys(("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "ARRIVES", "WARPSYNC"), "bar"),
    "SHFL": "shfl",
    **dict.fromkeys(("IMAD", "IADD3", "IADD", "VIADD", "VIADDMNMX", "ISETP", "LOP3", "LOP", "SEL", "SHF", "SHL",
                     "SHR", "LEA", "IABS", "IMNMX", "VIMNMX", "VIMNMX3", "IMUL", "FLO", "POPC", "BMSK", "BREV",
                     "PRMT", "PLOP3", "I2F", "I2FP", "F2I", "F2IP", "IDP", "MOV32I", "ISCADD"), "int"),
    **dict.fromkeys(("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "HADD2", "HMUL2",
                     "HFMA2", "HMNMX2", "HSETP2", "F2FP", "F2F", "DADD", "DMUL", "DFMA", "FRND"), "fp"),
    **dict.fromkeys(("STL", "LDL"), "spill"),
}
_GLOBAL = {"LDG", "LDGSTS", "STG", "ATOM", "ATOMG", "RED", "REDG"}
_UNMODELLED = {"UTMALDG", "UTMASTG", "UBLKCP", "UTMAREDG", "UBLKRED"}  # bulk copies: bytes not in the mnemonic
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}
_MMA_TYPES = {"BF16": "bf16", "F16": "f16", "TF32": "tf32", "E4M3": "fp8", "E5M2": "fp8"}


def _kind(op: str) -> str:
    base = op.split(".")[0]
    if base not in _KIND and base.startswith("U") and base[1:] in _KIND and _KIND[base[1:]] == "int":
        return "int"  # uniform-datapath integer ops (UIMAD, ULOP3, ...)
    return _KIND.get(base, "other")


def _access_bytes(op: str) -> int:
    """Bytes per lane of a global memory instruction, from its mnemonic (32-bit unless it says otherwise)."""
    parts = set(op.split(".")[1:])
    for token, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("16", 2), ("U8", 1), ("S8", 1)):
        if token in parts:
            return size
    return 4


def _mma_work(op: str) -> tuple[str, float]:
    """(type, FLOPs) of one executed MMA warp-instruction; a warpgroup MMA's work is split over its 4 warps."""
    parts = op.split(".")
    # fp16 operands carry no type suffix (HGMMA.64x64x16.F32, HMMA.16816.F32: the accumulator's type only)
    kind = next((_MMA_TYPES[p] for p in parts[2:] if p in _MMA_TYPES), None) if len(parts) > 3 else "f16"
    if parts[0] == "HMMA" and parts[1] in _HMMA_SHAPES and kind:
        m, n, k = _HMMA_SHAPES[parts[1]]
        return kind, 2.0 * m * n * k
    shape = re.fullmatch(r"(\d+)x(\d+)x(\d+)", parts[1]) if len(parts) > 1 else None
    if parts[0] in ("HGMMA", "QGMMA") and shape and kind:
        m, n, k = (int(v) for v in shape.groups())
        return kind, 2.0 * m * n * k / 4
    raise ValueError(f"static_sm90: MMA instruction {op} not modelled (add its shape and type)")


@dataclasses.dataclass
class Block:
    """Instructions that execute together: the code outside loops, or a loop body without its inner loops."""

    start: int
    end: int
    ops: list[str]  # mnemonics, subroutine bodies at their call sites included

    def mix(self) -> Counter:
        return Counter(_kind(op) for op in self.ops)

    def touched(self) -> int:
        """Bytes one warp's execution of the block touches in global memory (32 lanes x access width)."""
        return sum(32 * _access_bytes(op) for op in self.ops if op.split(".")[0] in _GLOBAL)

    def mma(self) -> Counter:
        """Tensor-core FLOPs of one warp's execution of the block, by operand type."""
        out: Counter = Counter()
        for op in self.ops:
            if _kind(op) == "mma":
                kind, flops = _mma_work(op)
                out[kind] += flops
        return out


def parse_sass(sass: str) -> list[tuple[int, str, str, str]]:
    """(address, mnemonic, operands, guard predicate or "") of every instruction of a cuobjdump/nvdisasm SASS
    listing."""
    return [(int(a, 16), op, rest.strip(), pred.strip()) for a, pred, op, rest in _INSTR.findall(sass)]


def analyze_sass(instrs: list[tuple[int, str, str]]) -> tuple[Block, list[Block]]:
    """Split the code into the part outside loops and one block per loop (address order, outer first).

    A loop is the range from a backward branch's target to the last backward branch to that target; loops must
    nest. Subroutines (from a CALL's target to its RET) are counted at every call site. Self-branches (the
    ``BRA`` to itself after ``EXIT``) and the padding ``NOP``s after them are not code.
    """
    for _, op, _, _ in instrs:
        if op.split(".")[0] in _UNMODELLED:
            raise ValueError(f"static_sm90: {op} (bulk/TMA copy) not modelled")
    code, guarded, padding = [], set(), False
    for addr, op, rest, pred in instrs:
        m = _TARGET.search(rest)
        if op.startswith("BRA") and m and int(m.group(1), 16) == addr:
            padding = True
        elif not (padding and op == "NOP"):
            padding = False
            if pred and pred not in ("@PT", "@UPT"):
                guarded.add(len(code))
            code.append((addr, op, rest))
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    # subroutines
    callees: dict[int, tuple[int, int]] = {}
    for addr, op, rest in code:
        if op.startswith("CALL"):
            m = _TARGET.search(rest)
            if not m or int(m.group(1), 16) not in index:
                raise ValueError(f"static_sm90: call {op} {rest} without a resolvable target")
            start = index[int(m.group(1), 16)]
            stop = next((j for j in range(start, len(code)) if code[j][1].startswith("RET")), None)
            if stop is None:
                raise ValueError(f"static_sm90: subroutine at {code[start][0]:#x} has no RET")
            callees[code[start][0]] = (start, stop)
    in_callee = set()
    for start, stop in callees.values():
        in_callee.update(range(start, stop + 1))
    # loops
    heads: dict[int, int] = {}
    for i, (addr, op, rest) in enumerate(code):
        m = _TARGET.search(rest)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            if i in in_callee:
                raise ValueError(f"static_sm90: loop inside a subroutine at {addr:#x} not modelled")
            heads[index[target]] = max(heads.get(index[target], i), i)
    spans = sorted(heads.items(), key=lambda s: (s[0], -s[1]))
    for (a0, a1), (b0, b1) in itertools.combinations(spans, 2):
        if a0 < b0 <= a1 < b1:
            raise ValueError(f"static_sm90: loops {code[a0][0]:#x}-{code[a1][0]:#x} and {code[b0][0]:#x}-"
                             f"{code[b1][0]:#x} overlap without nesting")

    def owner(i: int) -> int:
        """Innermost loop holding instruction i (-1: outside loops)."""
        inner = -1
        for n, (s0, s1) in enumerate(spans):
            if s0 <= i <= s1:
                inner = n
        return inner

    ops: list[list[str]] = [[] for _ in range(len(spans) + 1)]
    for i, (addr, op, rest) in enumerate(code):
        if i in in_callee:
            continue
        ops[owner(i)].append(op)
        if op.startswith("CALL"):
            start, stop = callees[int(_TARGET.search(rest).group(1), 16)]
            ops[owner(i)].extend(code[j][1] for j in range(start, stop + 1))
    regions = [(0, len(code) - 1)] + spans
    for n, (lo, hi) in enumerate(regions):
        path = _longest_path(code, guarded, callees, index, lo, hi, [sp for sp in spans if sp != (lo, hi)])
        if path is not None:
            ops[n - 1] = path  # ops[-1] is the code outside loops
    outside = Block(code[0][0], code[-1][0], ops[-1])
    loops = [Block(code[s0][0], code[s1][0], ops[n]) for n, (s0, s1) in enumerate(spans)]
    return outside, loops


def _longest_path(code: list[tuple[int, str, str]], guarded: set[int], callees: dict[int, tuple[int, int]],
                  index: dict[int, int], lo: int, hi: int, inner: list[tuple[int, int]]) -> Optional[list[str]]:
    """The instructions on the longest path through code[lo..hi] (a loop body, its back edge at hi; or the whole
    kernel from its entry), inner loops skipped (they count as loops), subroutines at their call sites: one
    execution of the region takes one side of each forward branch. None when the region holds a divergent
    branch (``BSSY``: then both sides may execute, and every instruction counts)."""
    if any(code[i][1].startswith("BSSY") for i in range(lo, hi + 1)):
        return None
    heads = {s0: s1 for s0, s1 in inner if lo < s0 and s1 <= hi}  # inner loops, entered at their head
    best: dict[int, tuple[int, Optional[int], Optional[int]]] = {hi + 1: (0, None, None)}  # cost, next, jump

    def cost_from(j: Optional[int]) -> int:
        return best[j][0] if j is not None and j in best else 0

    for i in range(hi, lo - 1, -1):
        if i in heads:
            best[i] = (cost_from(heads[i] + 1), heads[i] + 1, None)
            continue
        addr, op, rest = code[i]
        cost = 1
        if op.startswith("CALL"):
            start, stop = callees[int(_TARGET.search(rest).group(1), 16)]
            cost += stop - start + 1
        m = _TARGET.search(rest)
        target = index.get(int(m.group(1), 16)) if op.startswith("BRA") and m else None
        forward = target is not None and target > i
        if op.startswith("BRA") and (i == hi or not forward):  # the region's back edge (or a jump back out)
            best[i] = (cost, None, None)
        elif op.startswith("BRA") and i not in guarded:  # unconditional: the jump, or leaving the region
            best[i] = (cost + cost_from(target if target <= hi else None), target if target <= hi else None, None)
        elif op.startswith("BRA"):  # conditional: the costlier side
            jump = target if target <= hi else None
            best[i] = (cost + max(cost_from(i + 1), cost_from(jump)), i + 1, jump)
        elif (op.startswith("EXIT") or op.startswith("RET")) and i not in guarded:
            best[i] = (cost, None, None)
        else:
            best[i] = (cost + cost_from(i + 1), i + 1, None)
    path, i = [], lo
    while i is not None and i <= hi:
        addr, op, rest = code[i]
        if i in heads:
            i = heads[i] + 1
            continue
        path.append(op)
        if op.startswith("CALL"):
            start, stop = callees[int(_TARGET.search(rest).group(1), 16)]
            path.extend(code[j][1] for j in range(start, stop + 1))
        _, nxt, jump = best[i]
        i = jump if jump is not None and cost_from(jump) > cost_from(nxt) else nxt
    return path


@functools.lru_cache(maxsize=None)
def _cubin_facts(cubin: bytes) -> tuple[int, str]:
    """(registers per thread, SASS listing) of a cubin, from Triton's bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), sass


def ctas_per_sm(regs: int, warps: int, smem: int) -> int:
    """Resident blocks per SM allowed by registers, shared memory and warps (0: the block cannot launch)."""
    warp_regs = cdiv(regs * 32, REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // 4 // warp_regs) * 4 // warps
    block_smem = cdiv(smem + SMEM_RESERVED_PER_BLOCK, SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = SMEM_PER_SM // block_smem if smem <= SMEM_PER_BLOCK else 0
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)


def occupancy_seconds(warp_instr: int, programs: int, warps: int, ctas: int, warp_ipc: float = WARP_IPC) -> float:
    """The launch's instructions at the issue rate its resident warps sustain, in whole waves (module
    docstring, occupancy_us); inf when a block cannot launch."""
    if ctas == 0:
        return math.inf
    resident = min(ctas, cdiv(programs, SMS))
    waves = cdiv(programs, SMS * resident)
    rate = min(ISSUE_PER_CLOCK, resident * warps * warp_ipc)
    return waves * resident * (warp_instr / programs) / rate / CLOCK_HZ


def predicted_seconds(warp_instr: int, programs: int, warps: int, ctas: int, roofline_s: float,
                      warp_ipc: float = WARP_IPC) -> float:
    """predicted_us of a launch, in seconds (module docstring): the slowest of its occupancy-limited issue time,
    its roofline and the launch floor."""
    return max(occupancy_seconds(warp_instr, programs, warps, ctas, warp_ipc), roofline_s, KERNEL_FLOOR_S)


def calibrate(rows: list[dict], measured: list[dict]) -> tuple[float, list[dict]]:
    """Fit WARP_IPC to measured kernel times (``kernel_times.py``'s rows: op, case, direction, kernel, us).

    Each measured kernel is matched with the model's launches of the same name, case and direction (the kernels
    of the commit that was measured: run this at that commit). Returns the WARP_IPC (on a 1% grid from 0.02 to
    1) whose predictions have the least mean squared log error, and per kernel the measured time, the
    predictions at that value and at WARP_IPC, and measured / predicted."""
    launches: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("warps"):
            launches.setdefault((r["op"], r["case"], r["direction"], r["kernel"]), []).append(r)

    def predicted(key: tuple, ipc: float) -> float:
        return sum(1e6 * predicted_seconds(r["warp_instructions"], math.prod(r["grid"]), r["warps"],
                                           r["ctas_per_sm"], r["roofline_us"] / 1e6, ipc) for r in launches[key])

    pairs = [(key, m["us"]) for m in measured if m.get("us") and
             (key := (m["op"], m["case"], m.get("direction"), m["kernel"])) in launches]
    if not pairs:
        raise ValueError("static_sm90: no measured kernel matches a modelled launch (same op, case, direction "
                         "and kernel name)")
    grid = [0.02 * 1.01 ** i for i in range(int(math.log(50) / math.log(1.01)) + 1)]
    error = lambda ipc: sum(math.log(predicted(k, ipc) / us) ** 2 for k, us in pairs)  # noqa: E731
    best = min(grid, key=error)
    table = [dict(op=k[0], case=k[1], direction=k[2], kernel=k[3], measured_us=us,
                  fitted_us=round(predicted(k, best), 3), model_us=round(predicted(k, WARP_IPC), 3),
                  ratio=round(us / predicted(k, WARP_IPC), 3)) for k, us in pairs]
    return round(best, 4), table


def read_kernel_times(path: str) -> list[dict]:
    """``kernel_times.py``'s rows from its JSON, or from the kernel_times table of a GPU results page
    (``benchmarks/results/<device>.md``, as summarize.py writes it): op, case, direction, kernel, launches, us."""
    with open(path) as f:
        text = f.read()
    if not path.endswith(".md"):
        return json.loads(text)["rows"]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("soft_split", "performer") and cells[2] in ("fwd", "bwd"):
            try:
                rows.append(dict(op=cells[0], case=cells[1], direction=cells[2], kernel=cells[3],
                                 launches=float(cells[4]), us=float(cells[5])))
            except ValueError:  # not a number: another table's row
                continue
    return rows


def calibration_markdown(best: float, table: list[dict], source: str) -> str:
    lines = [f"# Static model vs measured kernel times ({source})", "",
             f"WARP_IPC now {WARP_IPC}; best fit {best} (least mean squared log error over {len(table)} kernels).",
             "", "| op | case | dir | kernel | measured us | model us | measured / model | at the fit us |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {t['op']} | {t['case']} | {t['direction']} | {t['kernel']} | {t['measured_us']:.1f} | "
              f"{t['model_us']:.1f} | {t['ratio']:.2f} | {t['fitted_us']:.1f} |" for t in table]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Bytes of tensors and eager ops
# ----------------------------------------------------------------------------------------------------------
def _elements(t: torch.Tensor) -> int:
    """Distinct elements a strided tensor addresses (broadcast dimensions counted once)."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.numel() else 0


def _nbytes(t: torch.Tensor) -> int:
    return _elements(t) * t.element_size()


def distinct_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of memory the tensors cover together, each byte once (aliases and overlapping views merged)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    total = 0
    for group in groups.values():
        if len(group) == 1:
            total += _nbytes(group[0])
            continue
        marks = torch.zeros(group[0].untyped_storage().nbytes(), dtype=torch.uint8)
        for t in group:
            size = t.element_size()
            for byte in range(size):
                marks.as_strided(t.shape, [s * size for s in t.stride()], t.storage_offset() * size + byte).fill_(1)
        total += int(marks.sum())
    return total


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


_FREE_OPS = {"empty", "empty_like", "empty_strided", "_unsafe_view", "detach", "lift_fresh", "alias", "set_",
             "resize_"}
_CONTIGUOUS_INSIDE = {"im2col", "col2im", "native_layer_norm", "native_layer_norm_backward"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


@dataclasses.dataclass
class EagerKernel:
    """One eager PyTorch kernel at its roofline: bytes read + written, matmul FLOPs."""

    name: str
    bytes: int
    flops: float = 0.0
    flop_type: str = "bf16"

    @property
    def roofline_us(self) -> float:
        return 1e6 * max(self.bytes / HBM_BYTES_PER_S, self.flops / TC_FLOPS_PER_S[self.flop_type])


def eager_kernels(func, args: tuple, kwargs: dict, out: Any) -> list[EagerKernel]:
    """The CUDA kernels one aten op runs, each with the bytes it must read and write (see the docstring)."""
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in _FREE_OPS:
        return []
    inputs = {id(t): t for t in _tensors(list(args) + list(kwargs.values()))}
    outputs = {id(t): t for t in _tensors(out)}
    if not inputs and not outputs:
        return []  # no tensor in or out (e.g. aten.promote_types): no kernel
    if name == "copy_":
        inputs.pop(id(args[0]), None)  # the destination is written, not read
    kernels = []
    if name in _CONTIGUOUS_INSIDE:
        for t in inputs.values():
            if not t.is_contiguous():
                kernels.append(EagerKernel(f"{name}:contiguous", 2 * _nbytes(t)))
    flops, kind = 0.0, "bf16"
    if name in _MATMULS:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        flops = 2.0 * math.prod(a.shape) * b.shape[-1]
        kind = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(a.dtype, "fp32")
    if name == "native_layer_norm_backward" and args[-1][0] and any(args[-1][1:]):
        dy, x, _, mean, rstd, gamma = args[:6]
        dx, dgamma, dbeta = out
        reads = sum(_nbytes(t) for t in (dy, x, mean, rstd))
        kernels.append(EagerKernel(f"{name}:input", reads + sum(_nbytes(t) for t in _tensors([gamma, dx]))))
        kernels.append(EagerKernel(f"{name}:gamma_beta", reads + sum(_nbytes(t) for t in _tensors([dgamma, dbeta]))))
        return kernels
    total = sum(_nbytes(t) for t in inputs.values()) + sum(_nbytes(t) for t in outputs.values())
    return kernels + [EagerKernel(name, total, flops, kind)]


class _RecordEager(TorchDispatchMode):
    """Records the eager kernels of every aten op that runs under it."""

    def __init__(self, sink: list[EagerKernel]):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.sink.extend(eager_kernels(func, args, kwargs, out))
        return out


_LOW = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv2d"}  # einsum: its bmm
_FP32 = {"layer_norm", "exp", "log"}
_FP32_RESULT = {"sum", "softmax", "log_softmax", "cumsum", "prod"}


class _Autocast(TorchFunctionMode):
    """What CUDA autocast to bf16 does to the ops the references use: matmul-like ops cast their floating inputs
    to bf16, the fp32-list ops to fp32, and sum (softmax, ...) reads a low-precision input as it is and gives an
    fp32 result."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        target = DTYPE if name in _LOW else torch.float32 if name in _FP32 else None
        if target is not None:
            args = tuple(a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        low = args and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.bfloat16, torch.float16)
        if name in _FP32_RESULT and low and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------
# name -> (channels, side, token view, kernel, stride, padding, out features, LayerNorm, grad_x in backward)
SOFT_SPLIT_CASES = {
    "stage1_224": (3, 224, False, 7, 4, 2, 192, True, False),
    "stage2_224": (64, 56, True, 3, 2, 1, 192, True, True),
    "final_224": (64, 28, True, 3, 2, 1, 384, False, True),
    "stage1_384": (3, 384, False, 7, 4, 2, 192, True, False),
}
PERFORMER_CASES = {"T3136": 3136, "T9216": 9216}  # tokens; B=64, H=1, d=64, m=32
PERFORMER_D, PERFORMER_M = 64, 32


def _soft_split_inputs(case: str, device: str, wrap: Callable) -> dict:
    C, side, tokens, k, s, p, out, norm, grad_x = SOFT_SPLIT_CASES[case]
    K = C * k * k
    new = lambda *shape, dtype=DTYPE: wrap(torch.empty(*shape, dtype=dtype, device=device))  # noqa: E731
    leaf = new(B, side * side, C) if tokens else new(B, C, side, side)
    return dict(leaf=leaf, tokens=tokens, side=side, k=k, s=s, p=p, grad_x=grad_x, weight=new(out, K),
                bias=new(out), norm_weight=new(K, dtype=torch.float32) if norm else None,
                norm_bias=new(K, dtype=torch.float32) if norm else None)


def _image(inp: dict, leaf: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) image the op sees: a token tensor viewed in place, as the model does."""
    if not inp["tokens"]:
        return leaf
    return leaf.transpose(1, 2).reshape(B, leaf.shape[2], inp["side"], inp["side"])


def _performer_inputs(case: str, device: str, wrap: Callable) -> dict:
    T = PERFORMER_CASES[case]
    kqv = wrap(torch.empty(B, T, 3 * PERFORMER_D, dtype=DTYPE, device=device))
    k, q, v = (t.unsqueeze(1) for t in torch.split(kqv, PERFORMER_D, dim=-1))
    return dict(kqv=kqv, q=q, k=k, v=v, w=torch.empty(PERFORMER_M, PERFORMER_D, device=device))


def run_fused(op: str, case: str, directions: tuple[str, ...]) -> dict[str, list]:
    """direction -> the launches (``Launch``) and eager host ops (``EagerKernel``) of the fused op, in order."""
    from t2t_fast.kernels import performer, soft_split

    steps: dict[str, list] = {d: [] for d in ("fwd", "bwd")}
    with sm90_host():
        def stage(direction: str, fn: Callable[[], Any]) -> Any:
            eager: list[EagerKernel] = []
            launches: list[Launch] = []
            with compile_only(launches), _RecordEager(eager):
                out = fn()
            steps[direction] = launches + eager
            return out

        if op == "soft_split":
            inp = _soft_split_inputs(case, "cpu", on_sm90)
            x = _image(inp, inp["leaf"])
            geo = ([inp["k"]] * 2, [inp["s"]] * 2, [inp["p"]] * 2)
            params = (inp["weight"], inp["bias"], inp["norm_weight"], inp["norm_bias"])
            y, mean, rstd = stage("fwd", lambda: soft_split.forward(x, *geo, *params, 1e-5))
            if "bwd" in directions:
                stage("bwd", lambda: soft_split.backward(on_sm90(torch.empty_like(y)), x, *geo, *params, y, mean,
                                                         rstd, inp["grad_x"]))
        else:
            inp = _performer_inputs(case, "cpu", on_sm90)
            y, *stats = stage("fwd", lambda: performer.forward(inp["q"], inp["k"], inp["v"], inp["w"], 1e-8))
            if "bwd" in directions:
                stage("bwd", lambda: performer.backward(on_sm90(torch.empty_like(y)), inp["q"], inp["k"], inp["v"],
                                                        inp["w"], *stats))
    return {d: steps[d] for d in directions}


def run_reference(op: str, case: str, autocast: bool = True) -> dict[str, list[EagerKernel]]:
    """direction -> the eager kernels of ``t2t_fast.reference``'s op under (emulated) CUDA autocast to bf16, or
    without autocast on the bf16 tensors (LayerNorm parameters in bf16 too, as bench_soft_split.py runs it)."""
    from t2t_fast import reference

    fwd: list[EagerKernel] = []
    bwd: list[EagerKernel] = []
    req = lambda t: t.requires_grad_() if t is not None else None  # noqa: E731
    mode = _Autocast if autocast else contextlib.nullcontext
    if op == "soft_split":
        inp = _soft_split_inputs(case, "meta", lambda t: t)
        if not autocast:
            inp.update((n, inp[n].to(DTYPE)) for n in ("norm_weight", "norm_bias") if inp[n] is not None)
        params = [req(inp[n]) for n in ("weight", "bias", "norm_weight", "norm_bias")]
        leaf = req(inp["leaf"]) if inp["grad_x"] else inp["leaf"]
        x = _image(inp, leaf)
        wrt = ([x] if inp["grad_x"] else []) + [t for t in params if t is not None]
        with _RecordEager(fwd), mode():
            y = reference.soft_split(x, inp["k"], inp["s"], inp["p"], *params)
    else:
        inp = _performer_inputs(case, "meta", lambda t: t)
        req(inp["kqv"])
        k, q, v = (t.unsqueeze(1) for t in torch.split(inp["kqv"], PERFORMER_D, dim=-1))
        wrt = [q, k, v]
        with _RecordEager(fwd), mode():
            y = reference.performer_attention(q, k, v, inp["w"])
    with _RecordEager(bwd):
        torch.autograd.grad(y, wrt, torch.empty_like(y))
    return dict(fwd=fwd, bwd=bwd)


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------
def _us(seconds: float) -> float:
    return round(1e6 * seconds, 3)


def launch_row(a: Launch) -> dict:
    """The model's numbers for one launch (see the module docstring)."""
    if a.kernel not in TRIPS:
        raise KeyError(f"static_sm90: kernel {a.kernel} has no trip-count entry in TRIPS; add one")
    regs, sass = _cubin_facts(a.cubin)
    outside, loops = analyze_sass(parse_sass(sass))
    trips = TRIPS[a.kernel](a)
    if isinstance(trips, dict):
        trips = trips.get(len(loops), [])
    if len(trips) != len(loops):
        spans = ", ".join(f"{lp.start:#x}-{lp.end:#x}" for lp in loops)
        raise ValueError(f"static_sm90: {a.kernel}: TRIPS gives {len(trips)} loop(s), its SASS has {len(loops)} "
                         f"({spans}); update TRIPS['{a.kernel}'] to match the kernel")
    execs = [(outside, a.programs)] + list(zip(loops, trips))
    warp_instr = a.warps * sum(len(b.ops) * n for b, n in execs)
    mix: Counter = Counter()
    flops: Counter = Counter()
    touched = 0
    for block, n in execs:
        for kind, count in block.mix().items():
            mix[kind] += count * n * a.warps
        for kind, f in block.mma().items():
            flops[kind] += f * n * a.warps
        touched += block.touched() * n * a.warps
    tensors = [t for t in a.args.values() if isinstance(t, torch.Tensor)]
    min_bytes = distinct_bytes(tensors)
    issue = warp_instr / (SMS * ISSUE_PER_CLOCK * CLOCK_HZ)
    ctas = ctas_per_sm(regs, a.warps, a.shared)
    occupancy = occupancy_seconds(warp_instr, a.programs, a.warps, ctas)
    tc_time = sum(f / TC_FLOPS_PER_S[k] for k, f in flops.items())
    roofline = max(min_bytes / HBM_BYTES_PER_S, tc_time)
    return dict(
        kernel=a.kernel, grid=list(a.grid), warps=a.warps, stages=a.stages, regs=regs,
        spills=sum(1 for _, op, _, _ in parse_sass(sass) if _kind(op) == "spill"), smem_bytes=a.shared,
        ctas_per_sm=ctas, sass_instructions=len(outside.ops) + sum(
            len(lp.ops) for lp in loops),
        loops=[dict(start=f"{lp.start:#x}", end=f"{lp.end:#x}", instructions=len(lp.ops), executions=n,
                    trips_per_program=round(n / a.programs, 3), mix={k: v for k, v in lp.mix().items()})
               for lp, n in zip(loops, trips)],
        outside_instructions=len(outside.ops), warp_instructions=warp_instr, mix={k: mix[k] for k in MIX if mix[k]},
        issue_floor_us=_us(issue), occupancy_us=_us(occupancy), min_bytes=min_bytes, touched_bytes=touched,
        tc_flops=sum(flops.values()), tc_flops_by_type=dict(flops), roofline_us=_us(roofline),
        predicted_us=_us(predicted_seconds(warp_instr, a.programs, a.warps, ctas, roofline)),
        bound="launch" if KERNEL_FLOOR_S > max(occupancy, roofline) else "issue" if issue > roofline else
        "occupancy" if occupancy > roofline else "tensor cores" if tc_time > min_bytes / HBM_BYTES_PER_S else
        "memory")


_NOT_COMPILED = dict(warps=None, stages=None, regs=None, spills=None, smem_bytes=None, ctas_per_sm=None)


def eager_row(k: EagerKernel) -> dict:
    """An eager op of the fused side's host code, at its roofline."""
    return dict(kernel=f"torch:{k.name}", **_NOT_COMPILED, warp_instructions=0, issue_floor_us=0.0,
                occupancy_us=0.0, min_bytes=k.bytes, touched_bytes=k.bytes, tc_flops=k.flops,
                roofline_us=round(k.roofline_us, 3), predicted_us=round(k.roofline_us, 3),
                bound="memory" if k.flops == 0 else "tensor cores")


def reference_row(kernels: list[EagerKernel]) -> dict:
    """The eager reference of one case and direction: its kernels, each at its roofline, summed."""
    total, moved = sum(k.roofline_us for k in kernels), sum(k.bytes for k in kernels)
    return dict(kernel="reference", eager_kernels=len(kernels), **_NOT_COMPILED, warp_instructions=0,
                issue_floor_us=0.0, occupancy_us=0.0, min_bytes=moved, touched_bytes=moved,
                tc_flops=sum(k.flops for k in kernels), roofline_us=round(total, 3), predicted_us=round(total, 3),
                ops=[dict(name=k.name, bytes=k.bytes, flops=k.flops, us=round(k.roofline_us, 3)) for k in kernels])


def model(op: str, case: str, directions: tuple[str, ...], sass_dir: Optional[str] = None) -> list[dict]:
    """Rows of one op and case: every fused launch and eager host op, then the reference, per direction.
    With ``sass_dir``, each launch's SASS is written there as ``<op>_<case>_<direction>_<n>_<kernel>.sass``."""
    fused = run_fused(op, case, directions)
    ref, plain = run_reference(op, case), run_reference(op, case, autocast=False)
    rows = []
    for d in directions:
        for n, step in enumerate(fused[d]):
            if sass_dir and isinstance(step, Launch):
                with open(os.path.join(sass_dir, f"{op}_{case}_{d}_{n}_{step.kernel}.sass"), "w") as f:
                    f.write(_cubin_facts(step.cubin)[1])
            row = launch_row(step) if isinstance(step, Launch) else eager_row(step)
            rows.append(dict(op=op, case=case, direction=d, **row))
        rows.append(dict(op=op, case=case, direction=d, **reference_row(ref[d]),
                         no_autocast_us=round(sum(k.roofline_us for k in plain[d]), 3)))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per op, case and direction: fused total vs reference total (predicted us) and the predicted speedup."""
    out = []
    for key in dict.fromkeys((r["op"], r["case"], r["direction"]) for r in rows):
        mine = [r for r in rows if (r["op"], r["case"], r["direction"]) == key]
        ref = next(r for r in mine if r["kernel"] == "reference")
        out.append(dict(op=key[0], case=key[1], direction=key[2],
                        fused_us=sum(r["predicted_us"] for r in mine if r["kernel"] != "reference"),
                        reference_us=ref["predicted_us"], no_autocast_us=ref["no_autocast_us"],
                        over_roofline=[f"{r['kernel']} ({r['bound']})" for r in mine
                                       if r.get("bound") in ("issue", "occupancy", "launch")]))
    for op, case in dict.fromkeys((s["op"], s["case"]) for s in out):
        both = [s for s in out if (s["op"], s["case"]) == (op, case)]
        if len(both) == 2:
            out.append(dict(op=op, case=case, direction="fwd+bwd",
                            **{k: sum(s[k] for s in both) for k in ("fused_us", "reference_us", "no_autocast_us")},
                            over_roofline=list(dict.fromkeys(k for s in both for k in s["over_roofline"]))))
    for s in out:
        for k in ("fused_us", "reference_us", "no_autocast_us"):
            s[k] = round(s[k], 3)
        s["speedup"] = round(s["reference_us"] / s["fused_us"], 3)
        s["speedup_no_autocast"] = round(s["no_autocast_us"] / s["fused_us"], 3)
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "t2t_fast"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (uncommitted kernel changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def markdown(rows: list[dict], summary: list[dict], meta: dict) -> str:
    lines = [
        "# Static sm_90 model of the fused kernels: a prediction from compiled code, not a measurement",
        "",
        f"Generated by `python benchmarks/static_sm90.py{meta['argv']}` at commit {meta['commit']}, triton "
        f"{meta['triton']}, torch {meta['torch']}. Every Triton launch of the kernels' host code was compiled for "
        "sm_90 on a CPU-only machine and its SASS counted; nothing ran on a GPU. Model and assumptions: the "
        "docstring of `benchmarks/static_sm90.py`.",
        "",
        f"Constants: {SMS} SMs x {ISSUE_PER_CLOCK} warp-instructions/clock x {CLOCK_HZ / 1e9:.2f} GHz issue, "
        f"{WARP_IPC} per resident warp per clock (calibrated on the H200 run at e4dd2db); HBM "
        f"{HBM_BYTES_PER_S / 1e12:.2f} TB/s; tensor cores {TC_FLOPS_PER_S['bf16'] / 1e12:.0f} TFLOP/s bf16/fp16, "
        f"{TC_FLOPS_PER_S['tf32'] / 1e12:.0f} tf32; {REGS_PER_SM} registers, {SMEM_PER_SM // 1024} KB shared "
        f"memory ({SMEM_PER_BLOCK // 1024} KB per block, {SMEM_RESERVED_PER_BLOCK // 1024} KB reserved per block), "
        f"{MAX_WARPS_PER_SM} warps, {MAX_BLOCKS_PER_SM} blocks per SM. B={B}, bf16.",
        "",
        "## Predicted time per case: fused vs the eager reference",
        "",
        "The reference as autocast (bf16) runs it in the model, and (last two columns) the same on bf16 tensors "
        "without autocast, as `bench_soft_split.py`/`bench_performer.py` time it; each eager kernel at its "
        "roofline (optimistic for the reference). Fused: the sum of its launches' predicted times and of its "
        "host code's eager ops at their roofline.",
        "",
        "| op | case | direction | fused us | reference us (autocast) | predicted speedup | reference us (no "
        "autocast) | speedup | fused kernels over their roofline (why) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        lines.append(f"| {s['op']} | {s['case']} | {s['direction']} | {s['fused_us']:.1f} | {s['reference_us']:.1f} "
                     f"| {s['speedup']:.2f}x | {s['no_autocast_us']:.1f} | {s['speedup_no_autocast']:.2f}x | "
                     f"{', '.join(s['over_roofline']) or '-'} |")
    lines += [
        "",
        "## Per kernel",
        "",
        "`loops`: SASS instructions of each loop body (inner loops excluded) x its trips per program. MB are 1e6 "
        "bytes. `issue us`: the instructions at 4 per SM per clock; `occupancy us`: at the rate the resident warps "
        f"sustain ({WARP_IPC} per warp per clock, calibrated on the H200), in whole waves. `bound`: what sets the "
        "predicted time (issue: even the issue floor is over the roofline; occupancy: too few resident warps; "
        f"launch: under the {KERNEL_FLOOR_S * 1e6:g} us a launch takes at least).",
        "",
        "| op | case | dir | kernel | grid | warps | stages | regs | spills | smem KB | CTAs/SM | outside + loops "
        "| M warp-instr | issue us | occupancy us | min MB | touched MB | TC GFLOP | roofline us | predicted us "
        "| bound |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    shown: list[dict] = []
    for r in rows:  # the fused side's eager host ops: one line per case and direction
        if r["kernel"].startswith("torch:") and shown and shown[-1]["kernel"].startswith("torch:") \
                and (shown[-1]["case"], shown[-1]["direction"]) == (r["case"], r["direction"]):
            last = shown[-1]
            names = list(dict.fromkeys(last["kernel"][6:].split(", ") + [r["kernel"][6:]]))
            shown[-1] = dict(last, kernel="torch:" + ", ".join(names), min_bytes=last["min_bytes"] + r["min_bytes"],
                             roofline_us=last["roofline_us"] + r["roofline_us"],
                             predicted_us=last["predicted_us"] + r["predicted_us"])
        else:
            shown.append(r)
    for r in shown:
        if r["kernel"] == "reference":
            lines.append(f"| {r['op']} | {r['case']} | {r['direction']} | **reference** ({r['eager_kernels']} eager "
                         f"kernels) | | | | | | | | | | | | {_mb(r['min_bytes'])} | | {r['tc_flops'] / 1e9:.1f} | "
                         f"{r['roofline_us']:.1f} | {r['predicted_us']:.1f} | roofline |")
        elif r["kernel"].startswith("torch:"):
            lines.append(f"| {r['op']} | {r['case']} | {r['direction']} | {r['kernel']} | | | | | | | | | | | | "
                         f"{_mb(r['min_bytes'])} | | | {r['roofline_us']:.1f} | {r['predicted_us']:.1f} | memory |")
        else:
            loops = " + ".join(f"{lp['instructions']}x{lp['trips_per_program']:g}" for lp in r["loops"])
            lines.append(
                f"| {r['op']} | {r['case']} | {r['direction']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | "
                f"{r['warps']} | {r['stages']} | {r['regs']} | {r['spills']} | {r['smem_bytes'] / 1024:.0f} | "
                f"{r['ctas_per_sm']} | {r['outside_instructions']}{' + ' + loops if loops else ''} | "
                f"{r['warp_instructions'] / 1e6:.1f} | {r['issue_floor_us']:.1f} | {r['occupancy_us']:.1f} | "
                f"{_mb(r['min_bytes'])} | "
                f"{_mb(r['touched_bytes'])} | {r['tc_flops'] / 1e9:.1f} | {r['roofline_us']:.1f} | "
                f"{r['predicted_us']:.1f} | {r['bound']} |")
    lines += ["", "## Loop instruction mix (per loop body, inner loops excluded)", "",
              "| op | case | dir | kernel | loop | instr | " + " | ".join(MIX) + " |",
              "|---|---|---|---|---|---:|" + "---:|" * len(MIX)]
    for r in rows:
        for lp in r.get("loops", []):
            lines.append(f"| {r['op']} | {r['case']} | {r['direction']} | {r['kernel']} | {lp['start']}-{lp['end']} "
                         f"| {lp['instructions']} | " + " | ".join(str(lp["mix"].get(k, 0)) for k in MIX) + " |")
    return "\n".join(lines) + "\n"


def plan(args: argparse.Namespace) -> list[tuple[str, str, tuple[str, ...]]]:
    """(op, case, directions) to model. --quick: the first case of each op, forward only."""
    ops = [args.op] if args.op else ["soft_split", "performer"]
    cases = {"soft_split": list(SOFT_SPLIT_CASES), "performer": list(PERFORMER_CASES)}
    if args.case:
        cases = {op: [c for c in cases[op] if c in args.case] for op in ops}
        ops = [op for op in ops if cases[op]]
    if args.quick:
        return [(op, cases[op][0], ("fwd",)) for op in ops]
    return [(op, case, ("fwd", "bwd")) for op in ops for case in cases[op]]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=["soft_split", "performer"], help="one op only (default: both)")
    p.add_argument("--quick", action="store_true", help="the first case of each op, forward only")
    p.add_argument("--case", action="append", choices=[*SOFT_SPLIT_CASES, *PERFORMER_CASES],
                   help="only these cases (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the summary as JSON")
    p.add_argument("--sass", metavar="DIR", help="also write every launch's SASS listing into DIR")
    p.add_argument("--calibrate", metavar="KERNEL_TIMES",
                   help="print the model against kernel_times.py's measurements (its JSON, or a GPU results page "
                        "with its table; run at the commit measured) and the WARP_IPC that fits them, instead of "
                        "the page")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile them, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    missing = tools_missing()
    if missing:
        print(f"static_sm90: {missing}", file=sys.stderr)
        return 2
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a)
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    meta = dict(argv=argv_text, commit=_commit(), triton=triton.__version__, torch=torch.__version__,
                constants=CONSTANTS, batch=B, dtype="bf16")
    rows = []
    for op, case, directions in plan(args):
        print(f"static_sm90: compiling {op} {case} {'+'.join(directions)}", file=sys.stderr, flush=True)
        rows += model(op, case, directions, args.sass)
    summary = summarize(rows)
    if args.calibrate:
        print(calibration_markdown(*calibrate(rows, read_kernel_times(args.calibrate)), args.calibrate), end="")
    else:
        print(markdown(rows, summary, meta), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
