"""Static checks of the performer's Triton launches for Hopper (sm_90), no GPU needed.

- Every (d, m) ``verify`` accepts compiles for sm_90 within the per-SM limits (registers without spills,
  shared memory), and reaches the CTAs per SM its configuration plans the chunking for. The kernels are
  compiled through ``triton.compile`` for a GPUTarget("cuda", 90) (ptxas ships with triton), with the
  constexprs the host code launches them with; compiled kernels land in Triton's cache, so reruns are fast.
  The default run compiles the largest (d, m) of each tile configuration for float32 and bfloat16 (resources grow
  with d and m at a fixed tile); ``-m slow`` compiles every accepted (d, m) of d in {32, 64, 128} x m in
  {16, 32, 64, 128, 256} in every dtype. ``verify`` refuses the rest (the registry routes those elsewhere).
- The launch grids at 1024 px (T = 65536 tokens) and B = 64, 256 stay within CUDA's grid limits.
- ``verify`` (the Triton backend's limits for the registry) on shapes alone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from t2t_fast.kernels import performer as kernel  # noqa: E402

SM90_SMEM = 227 * 1024  # per CTA (opt-in maximum)
SM90_REGS = 65536
TOKEN_KERNELS = {  # kernel -> (pointer args in the input dtype, the _Config field of its planned CTAs per SM)
    "_kv_partial_kernel": (("k_ptr", "v_ptr"), "fwd_ctas"),
    "_attend_kernel": (("q_ptr", "y_ptr"), "fwd_ctas"),
    "_query_grad_kernel": (("dy_ptr", "q_ptr", "dq_ptr"), "bwd_ctas"),
    "_key_grad_kernel": (("k_ptr", "v_ptr", "dk_ptr", "dv_ptr"), "key_ctas"),
}
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes: spills) of a cubin, from triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    local = int(re.search(r"STACK:(\d+)", out).group(1)) + int(re.search(r"LOCAL:(\d+)", out).group(1))
    return int(re.search(r"REG:(\d+)", out).group(1)), local


def _compile_sm90(fn, d: int, m: int, dtype: torch.dtype):
    """Compile a token kernel for sm_90 as the host code launches it; returns (compiled kernel, num_warps).
    Needs the real JIT (not TRITON_INTERPRET): see ``_fit``."""
    consts = kernel._constexprs(d, m, dtype, interp=False)
    options = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
    io_ptrs, _ = TOKEN_KERNELS[fn.__name__]
    # as the launcher specializes the token performer's call (H = 1; q, k, v views of a packed projection, w
    # contiguous): unit strides of the last dimension and H = 1 become constants, pointers, T and the other
    # strides are multiples of 16
    consts.update({name: 1 for name in fn.arg_names if re.fullmatch(r"s[a-z]_d|H", name)})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (_TL[dtype] if name in io_ptrs else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("eps_"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if re.fullmatch(r"s[a-z]_[bhtm]|T", name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), options["num_warps"]


def _fit(d: int, m: int, dtype: torch.dtype) -> list[dict]:
    """Registers, local memory, shared memory and warps of each token kernel, compiled in a child process:
    the tests run under TRITON_INTERPRET=1, whose kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__, str(d), str(m), str(dtype).removeprefix("torch.")], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _ctas_per_sm(regs: int, smem: int, warps: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    return min(SM90_REGS // (per_warp * warps), (228 * 1024) // (smem + 1024), 64 // warps)


def _accepted(d: int, m: int) -> bool:
    q = torch.empty(1, 1, 8, d, device="meta")
    return kernel.verify(q, q, q, torch.empty(m, d, device="meta"), 1e-8) is None


ACCEPTED = [(d, m) for d in (32, 64, 128) for m in (16, 32, 64, 128, 256) if _accepted(d, m)]
REFUSED = [(d, m) for d in (32, 64, 128) for m in (16, 32, 64, 128, 256) if not _accepted(d, m)]


def _largest_of_each_config(dtype: torch.dtype) -> list[tuple[int, int]]:
    """The largest accepted (d, m) of each distinct tile configuration of a dtype (d = 64, the models' head
    width, among equals)."""
    largest = {}
    for d, m in ACCEPTED:
        cfg = kernel._config(d, m, dtype)
        key = (cfg.block_t, cfg.num_warps, cfg.num_stages)
        largest[key] = max(largest.get(key, (0, 0)), (d, m), key=lambda dm: (dm[0] * dm[1], dm[0] == 64))
    return sorted(largest.values())


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT = [(d, m, dt) for dt in DTYPES[:2] for d, m in _largest_of_each_config(dt)]
FULL = [pytest.param(d, m, dt, marks=pytest.mark.slow) for dt in DTYPES for d, m in ACCEPTED
        if (d, m, dt) not in DEFAULT]
# The CTAs per SM each configuration plans its chunking for hold at these; smaller (d, m) of a configuration
# can take a few more registers (one CTA less: a partial second wave, slower, never wrong), so the full sweep
# checks only the hard limits.
PLANNED = DEFAULT + [(64, 32, torch.float16), (64, 64, torch.float16)]


def test_refused_d_m_are_past_max_m_or_max_tile():
    assert REFUSED == [(d, m) for d in (32, 64, 128) for m in (16, 32, 64, 128, 256)
                       if m > kernel.MAX_M or max(16, d) * max(16, m) > kernel.MAX_TILE]


@pytest.mark.parametrize("d, m, dtype", DEFAULT + FULL, ids=lambda x: str(x).replace("torch.", ""))
def test_every_d_m_fits_sm90(d, m, dtype):
    cfg = kernel._config(d, m, dtype)
    problems = []
    for r in _fit(d, m, dtype):
        planned = getattr(cfg, TOKEN_KERNELS[r["kernel"]][1])
        ctas = _ctas_per_sm(r["regs"], r["smem"], r["warps"])
        if r["local"] or r["smem"] > SM90_SMEM or (ctas < planned and (d, m, dtype) in PLANNED):
            problems.append(f"{r['kernel']}: {r['regs']} registers, {r['local']} B local (spills), {r['smem']} B "
                            f"shared, {ctas} CTAs/SM for the {planned} planned")
    assert not problems, f"d={d} m={m} {dtype}: " + "; ".join(problems)


@pytest.mark.parametrize("B", (64, 256))
@pytest.mark.parametrize("d, m", ((64, 32), (64, 64)))
def test_launch_grids_at_1024_px(B, d, m):
    """65536 tokens per image: every launch is one grid axis (x, up to 2^31 - 1; the 65535 limit of axes y and z
    never applies), the chunks tile T exactly once, and no launch asks for more than one wave."""
    T, H = 65536, 1
    cfg = kernel._config(d, m, torch.bfloat16)
    for ctas in (cfg.fwd_ctas, cfg.bwd_ctas, cfg.key_ctas):
        grid = kernel._grid(B * H, T, m, d, cfg.block_t, ctas, 132)
        n_tiles = triton.cdiv(T, cfg.block_t)
        assert grid.programs == B * H * grid.n_chunks <= 2**31 - 1
        assert grid.combine_programs <= 2**31 - 1
        assert (grid.n_chunks - 1) * grid.tiles_per_chunk < n_tiles <= grid.n_chunks * grid.tiles_per_chunk
        assert grid.programs <= max(ctas * 132, B * H)  # one wave at most (one chunk per (b, h) at least)


def _meta(B: int, T: int, d: int, m: int, dtype: torch.dtype = torch.bfloat16):
    q = torch.empty(B, 1, T, d, dtype=dtype, device="meta")
    return q, q, q, torch.empty(m, d, device="meta")


def test_verify_limits():
    assert kernel.verify(*_meta(2, 10, 64, 32), 1e-8) is None
    assert kernel.verify(*_meta(2, 10, 129, 32), 1e-8) == "d=129 exceeds 128"
    assert kernel.verify(*_meta(2, 10, 64, 65), 1e-8) == "m=65 exceeds 64"
    assert kernel.verify(*_meta(2, 10, 128, 64), 1e-8) == "padded d x m=8192 exceeds 4096"


if __name__ == "__main__":  # _fit's child: python test_performer_sm90.py D M DTYPE -> one JSON line
    d_, m_, dt_ = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
    rows = []
    for name in TOKEN_KERNELS:
        compiled, warps = _compile_sm90(getattr(kernel, name), d_, m_, dt_)
        regs, local = _resources(compiled.asm["cubin"])
        rows.append(dict(kernel=name, regs=regs, local=local, smem=compiled.metadata.shared, warps=warps))
    print(json.dumps(rows))
