"""The static sm_90 model (``benchmarks/static_sm90.py``) counts what it claims to count.

Tiny test-only kernels with known answers are compiled for sm_90 in a child process (the kernels must be
decorated without ``TRITON_INTERPRET``, which this test session sets) and checked against hand counts: a loop
kernel's warp-instructions against its SASS counted here independently, a plain copy's touched and minimum bytes
against the exact bytes, a ``tl.dot``'s tensor-core FLOPs against 2*M*N*K (wgmma and mma.sync shapes). The child
also runs the tool itself on its ``--quick`` soft-split case. The SASS parser, the occupancy and byte helpers
are checked in process on made-up inputs. Skipped only when Triton's bundled ptxas/cuobjdump are missing.
"""
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import static_sm90 as sm  # noqa: E402

pytestmark = pytest.mark.skipif(sm.tools_missing() is not None, reason=str(sm.tools_missing()))

LOOP_TRIPS, LOOP_PROGRAMS, LOOP_WARPS, LOOP_BLOCK = 37, 5, 1, 1024
COPY_N = 64 * 1024
DOT_SHAPES = {"wgmma": (64, 64, 32, 4), "mma_sync": (16, 16, 16, 1)}  # M, N, K, warps
DOT_PROGRAMS = 3


@triton.jit
def _loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(n):  # 32 elements per thread: a body large enough that ptxas does not unroll it
        acc = acc * tl.load(x_ptr + i * BLOCK * tl.num_programs(0) + offs) + 1.0
    tl.store(y_ptr + offs, acc)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


def _child(out_dir: str) -> None:
    """Compile the tiny kernels for sm_90, model them, run the tool's --quick case; results as JSON files."""
    sm.TRIPS.update(_loop_kernel=lambda a: [a.programs * a["n"]], _copy_kernel=lambda a: [],
                    _dot_kernel=lambda a: [])
    launches: list = []
    with sm.compile_only(launches):
        x = torch.empty(LOOP_TRIPS * LOOP_PROGRAMS * LOOP_BLOCK)
        _loop_kernel[(LOOP_PROGRAMS,)](x, torch.empty(LOOP_PROGRAMS * LOOP_BLOCK), LOOP_TRIPS, BLOCK=LOOP_BLOCK,
                                       num_warps=LOOP_WARPS)
        _copy_kernel[(COPY_N // 1024,)](torch.empty(COPY_N), torch.empty(COPY_N), BLOCK=1024, num_warps=4)
        for M, N, K, warps in DOT_SHAPES.values():
            a, b = torch.empty(M, K, dtype=torch.bfloat16), torch.empty(K, N, dtype=torch.bfloat16)
            _dot_kernel[(DOT_PROGRAMS,)](a, b, torch.empty(M, N), M=M, N=N, K=K, num_warps=warps)
    rows = [dict(sm.launch_row(a), sass=sm._cubin_facts(a.cubin)[1]) for a in launches]
    # counts per number of loops, as for a loop that one ptxas unrolls and another does not
    sm.TRIPS["_loop_kernel"] = lambda a: {2: [0, 0], 1: [a.programs * a["n"]]}
    by_loops = sm.launch_row(launches[0])["warp_instructions"]
    sm.TRIPS["_loop_kernel"] = lambda a: []  # a kernel change the table missed
    try:
        sm.launch_row(launches[0])
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    # the int64-offset variants (BIG), which only tensors past 2^31 elements (1024 px at large batches) take
    from t2t_fast.kernels import soft_split

    int32, soft_split._INT32 = soft_split._INT32, 1000
    soft_split._geometry.cache_clear()
    big = {}
    for case in ("stage1_224", "stage2_224", "final_224"):
        launches = [la for d in sm.run_fused("soft_split", case, ("fwd", "bwd")).values() for la in d
                    if isinstance(la, sm.Launch)]
        big[case] = [(la.kernel, la.args.get("BIG"), sm.launch_row(la)["spills"]) for la in launches]
    soft_split._INT32 = int32
    soft_split._geometry.cache_clear()
    with open(os.path.join(out_dir, "tiny.json"), "w") as f:
        json.dump(dict(rows=rows, mismatch=mismatch, by_loops=by_loops, big=big), f)
    with open(os.path.join(out_dir, "quick.md"), "w") as f, contextlib.redirect_stdout(f):
        sm.main(["--quick", "--op", "soft_split", "--json", os.path.join(out_dir, "quick.json")])


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    out = tmp_path_factory.mktemp("static_sm90")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tiny = json.loads((out / "tiny.json").read_text())
    return dict(rows={r["kernel"]: r for r in tiny["rows"]},
                dots=[r for r in tiny["rows"] if r["kernel"] == "_dot_kernel"], mismatch=tiny["mismatch"],
                by_loops=tiny["by_loops"], big=tiny["big"],
                quick=json.loads((out / "quick.json").read_text()), page=(out / "quick.md").read_text())


def _hand_count(sass: str) -> tuple[int, int]:
    """(instructions outside the loop that a run entering the loop executes, instructions of the loop body) of a
    one-loop kernel, counted here: the block that such a run jumps over right after the loop (the zero-trip
    path, ``acc`` = 0) is left out."""
    code = [(int(a, 16), line) for a, line in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    end = next(i for i, (a, line) in enumerate(code) if re.search(rf"BRA 0x{a:x}\s*$", line))
    back = [(a, int(t, 16)) for a, line in code[:end] for t in re.findall(r"BRA 0x([0-9a-f]+)", line)
            if int(t, 16) < a]
    assert len(back) == 1, back
    tail, head = back[0]
    body = sum(1 for a, _ in code[:end] if head <= a <= tail)
    after = next(i for i, (a, _) in enumerate(code) if a > tail)
    skipped = 0
    jump = re.fullmatch(r"\s*BRA 0x([0-9a-f]+)\s*", code[after][1])  # unconditional: over the zero-trip block
    if jump:
        skipped = sum(1 for a, _ in code[:end] if code[after][0] < a < int(jump.group(1), 16))
    return end - body - skipped, body


def test_loop_warp_instructions_match_a_hand_count(child):
    row = child["rows"]["_loop_kernel"]
    outside, body = _hand_count(row["sass"])
    assert body > 3 and outside > 3
    assert row["warp_instructions"] == LOOP_WARPS * LOOP_PROGRAMS * (outside + body * LOOP_TRIPS)
    assert row["issue_floor_us"] == pytest.approx(
        row["warp_instructions"] / (sm.SMS * sm.ISSUE_PER_CLOCK * sm.CLOCK_HZ) * 1e6, abs=1e-3)
    assert [lp["trips_per_program"] for lp in row["loops"]] == [LOOP_TRIPS]


def test_trip_count_mismatch_is_an_error(child):
    assert "TRIPS gives 0 loop(s), its SASS has 1" in child["mismatch"]


def test_trip_counts_by_loop_count(child):
    """A TRIPS entry may give one list per number of loops (ptxas versions unroll differently): the SASS picks."""
    assert child["by_loops"] == child["rows"]["_loop_kernel"]["warp_instructions"]


def test_copy_bytes_are_exact(child):
    row = child["rows"]["_copy_kernel"]
    assert row["min_bytes"] == row["touched_bytes"] == 2 * COPY_N * 4
    assert row["tc_flops"] == 0 and row["spills"] == 0
    assert row["mix"]["ldg"] == row["mix"]["stg"]


@pytest.mark.parametrize("name", list(DOT_SHAPES))
def test_dot_flops_are_2mnk(child, name):
    M, N, K, warps = DOT_SHAPES[name]
    row = next(r for r in child["dots"] if r["warps"] == warps)
    mnemonic = "HGMMA" if name == "wgmma" else "HMMA"
    assert re.search(rf"\b{mnemonic}\.", row["sass"]), f"expected {mnemonic} for {name}"
    assert row["tc_flops"] == DOT_PROGRAMS * 2 * M * N * K
    assert set(row["tc_flops_by_type"]) == {"bf16"}


def test_quick_run_rows_and_page(child):
    rows, summary = child["quick"]["rows"], child["quick"]["summary"]
    needed = {"op", "kernel", "case", "direction", "regs", "spills", "smem_bytes", "ctas_per_sm",
              "warp_instructions", "issue_floor_us", "occupancy_us", "min_bytes", "touched_bytes", "roofline_us",
              "predicted_us"}
    assert all(needed <= set(r) for r in rows), [needed - set(r) for r in rows]
    triton_rows = [r for r in rows if r["kernel"].startswith("_")]
    assert {"_prepare_kernel", "_forward_kernel"} <= {r["kernel"] for r in triton_rows}
    for r in triton_rows:
        assert r["occupancy_us"] >= r["issue_floor_us"]
        assert r["predicted_us"] == max(r["occupancy_us"], r["roofline_us"], sm.KERNEL_FLOOR_S * 1e6)
        assert 0 < r["min_bytes"] and r["ctas_per_sm"] >= 1 and r["direction"] == "fwd"
    ref = [r for r in rows if r["kernel"] == "reference"]
    assert len(ref) == 1 and ref[0]["predicted_us"] > 0
    # stage 1: unfold, autocast's fp32 cast, the LayerNorm (with its contiguous copy), the cast back, one GEMM
    assert [op["name"] for op in ref[0]["ops"]] == ["im2col", "_to_copy", "native_layer_norm:contiguous",
                                                   "native_layer_norm", "_to_copy", "addmm"]
    assert ref[0]["tc_flops"] == 2 * 64 * 56 * 56 * 192 * 147
    assert summary[0]["speedup"] == pytest.approx(summary[0]["reference_us"] / summary[0]["fused_us"], rel=1e-3)
    assert "prediction from compiled code, not a measurement" in child["page"]
    assert "| soft_split | stage1_224 | fwd |" in child["page"]


def test_soft_split_int64_variants_compile(child):
    """Every soft-split kernel compiles for sm_90 in its int64-offset variant too (a runtime `if` that retyped a
    variable kept it from compiling; the interpreter runs it either way)."""
    for case, launches in child["big"].items():
        kernels = {k for k, big, _ in launches if big}
        assert {"_prepare_kernel", "_forward_kernel", "_backward_weight_kernel"} <= kernels, case
        assert ("_stats_kernel" in kernels) == (case != "final_224")


def test_sm90_host_patch_points_exist():
    """The names sm90_host() patches are still in the kernels' host code."""
    import t2t_fast.kernels.performer as performer
    import t2t_fast.kernels.soft_split as soft_split

    before = soft_split._num_sms, performer._sm_count
    with sm.sm90_host():
        assert soft_split._num_sms(0) == sm.SMS and performer._sm_count(torch.device("cpu")) == sm.SMS
    assert (soft_split._num_sms, performer._sm_count) == before
    assert sm.on_sm90(torch.empty(2)).is_cuda


def test_analyze_sass_nested_loops_and_calls():
    lines = ["MOV R0, RZ", "ISETP.GE.AND P0, PT, R0, 0x4, PT",  # 0x00, 0x10
             "IADD3 R1, R1, 0x1, RZ",  # 0x20: outer loop head
             "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x30: inner loop head
             "CALL.REL.NOINC 0xc0",  # 0x40
             "@P0 BRA 0x30",  # 0x50: inner back edge
             "HMMA.16816.F32.BF16 R8, R4, R6, R8",  # 0x60
             "@P1 BRA 0x20",  # 0x70: outer back edge
             "STG.E [R2.64], R8",  # 0x80
             "EXIT", "BRA 0xa0", "NOP",  # 0x90, 0xa0 (self-branch), 0xb0
             "FFMA R1, R2, R3, R4", "RET.REL.NODEC R20 0x0",  # 0xc0: subroutine, 0xd0
             "BRA 0xe0", "NOP", "NOP"]  # 0xe0: self-branch, padding
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    outside, loops = sm.analyze_sass(sm.parse_sass(sass))
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x70), (0x30, 0x50)]
    assert outside.ops == ["MOV", "ISETP.GE.AND", "STG.E", "EXIT"]
    assert loops[0].ops == ["IADD3", "HMMA.16816.F32.BF16", "BRA"]
    assert loops[1].ops == ["LDG.E.128", "CALL.REL.NOINC", "FFMA", "RET.REL.NODEC", "BRA"]
    assert loops[1].touched() == 32 * 16 and outside.touched() == 32 * 4
    assert loops[0].mma() == {"bf16": 2 * 16 * 8 * 16}
    assert loops[1].mix()["ldg"] == 1 and loops[0].mix()["int"] == 1


def _sass(lines: list[str]) -> list[tuple[int, str, str, str]]:
    return sm.parse_sass("\n".join(f"        /*{16 * i:04x}*/    {line} ;" for i, line in enumerate(lines)))


def test_analyze_sass_takes_one_side_of_each_branch():
    """A loop body's if/else (interior or border tile) executes one side per iteration: the costlier one counts,
    and a guarded EXIT or branch out of the loop is followed when the rest costs more; a divergent region
    (BSSY ... BSYNC) may run both sides, so there every instruction counts."""
    lines = ["MOV R0, RZ",  # 0x00
             "@P2 BRA 0x40", "IADD3 R9, R9, 0x1, RZ", "IADD3 R9, R9, 0x2, RZ",  # 0x10: a skippable prologue part
             "LDG.E R4, desc[UR4][R2.64]",  # 0x40: loop head
             "@P0 BRA 0x90",  # 0x50: if
             "FADD R5, R5, R4", "FADD R5, R5, R4",  # 0x60, 0x70: then (2 instructions)
             "BRA 0xd0",  # 0x80: skip the else
             "FMUL R5, R5, R4", "FMUL R5, R5, R4", "FMUL R5, R5, R4", "FMUL R5, R5, R4",  # 0x90-0xc0: else
             "@P1 BRA 0x40",  # 0xd0: back edge
             "@P3 EXIT", "STG.E [R2.64], R5", "EXIT", "BRA 0x110"]  # 0xe0-0x110
    outside, loops = sm.analyze_sass(_sass(lines))
    assert [(lp.start, lp.end) for lp in loops] == [(0x40, 0xd0)]
    assert loops[0].ops == ["LDG.E", "BRA", "FMUL", "FMUL", "FMUL", "FMUL", "BRA"]
    assert outside.ops == ["MOV", "BRA", "IADD3", "IADD3", "EXIT", "STG.E", "EXIT"]
    outside, _ = sm.analyze_sass(_sass(["BSSY B0, 0x30", "@P2 BRA 0x30", "IADD3 R9, R9, 0x1, RZ", "BSYNC B0",
                                        "EXIT", "BRA 0x50"]))
    assert outside.ops == ["BSSY", "BRA", "IADD3", "BSYNC", "EXIT"]


def test_mma_and_access_widths():
    assert sm._mma_work("HGMMA.64x32x16.F32.BF16") == ("bf16", 2 * 64 * 32 * 16 / 4)
    assert sm._mma_work("HGMMA.64x64x16.F32") == ("f16", 2 * 64 * 64 * 16 / 4)  # fp16: no type suffix
    assert sm._mma_work("HMMA.16816.F32") == ("f16", 2 * 16 * 8 * 16)
    assert sm._mma_work("HMMA.1688.F32.TF32") == ("tf32", 2 * 16 * 8 * 8)
    with pytest.raises(ValueError, match="not modelled"):
        sm._mma_work("HMMA.NEW.F32")
    assert [sm._access_bytes(op) for op in ("LDG.E", "LDG.E.64", "LDGSTS.E.BYPASS.128", "LDG.E.U16", "STG.E.U8",
                                            "LDG.E.LTC128B")] == [4, 8, 16, 2, 1, 4]


def test_ctas_per_sm():
    assert sm.ctas_per_sm(114, 8, 32768) == 2  # 3840 registers per warp: 4 warps per sub-partition
    assert sm.ctas_per_sm(32, 4, 0) == 16  # warps: 64 / 4
    assert sm.ctas_per_sm(16, 1, 0) == 32  # blocks
    assert sm.ctas_per_sm(64, 4, 100 * 1024) == 2  # shared memory: 228 KB / (100 + 1) KB
    assert sm.ctas_per_sm(64, 4, 228 * 1024) == 0  # over 227 KB per block


def test_occupancy_time():
    clock = sm.CLOCK_HZ
    # 2 resident blocks of 8 warps: 16 x WARP_IPC per clock, 3 waves of 2 x 132 blocks (the last one partial)
    rate = min(4, 16 * sm.WARP_IPC)
    assert sm.occupancy_seconds(1000 * 700, 700, 8, 2) == pytest.approx(3 * 2 * 1000 / rate / clock)
    # fewer blocks than SMs: one block per SM at one block's rate, one wave
    assert sm.occupancy_seconds(5 * 400, 5, 4, 6) == pytest.approx(400 / (4 * sm.WARP_IPC) / clock)
    # enough warps: the issue floor
    full = sm.occupancy_seconds(64 * 132 * 1000, 64 * 132, 4, 16)
    assert full == pytest.approx(64 * 132 * 1000 / (sm.SMS * sm.ISSUE_PER_CLOCK * clock))
    assert sm.occupancy_seconds(100, 1, 4, 0) == float("inf")


def test_plan_selects_ops_and_cases():
    both = ("fwd", "bwd")
    assert sm.plan(sm.parse_args(["--case", "T3136"])) == [("performer", "T3136", both)]
    assert sm.plan(sm.parse_args(["--op", "soft_split", "--case", "final_224", "--case", "stage1_224"])) == [
        ("soft_split", "stage1_224", both), ("soft_split", "final_224", both)]
    assert sm.plan(sm.parse_args(["--quick"])) == [("soft_split", "stage1_224", ("fwd",)),
                                                  ("performer", "T3136", ("fwd",))]


def test_kernel_times_read_from_a_results_page(tmp_path):
    page = tmp_path / "nvidia-h200.md"
    page.write_text("## kernel_times\n\n| op | case | direction | kernel | launches | us |\n|---|---|---|---|---|---|\n"
                    "| soft_split | stage1_224 | fwd | _forward_kernel | 1 | 163 |\n"
                    "| performer | T3136 | bwd | total | 3 | 71 |\n"
                    "| soft_split | stage1_224 | fwd | _prepare_kernel | n/a | n/a |\n"
                    "| 64 | 3136 | bf16 | 0.0533 | 0.764 | 1 |\n")
    assert sm.read_kernel_times(str(page)) == [
        dict(op="soft_split", case="stage1_224", direction="fwd", kernel="_forward_kernel", launches=1.0, us=163.0),
        dict(op="performer", case="T3136", direction="bwd", kernel="total", launches=3.0, us=71.0)]
    data = tmp_path / "kernel_times.json"
    data.write_text('{"meta": {}, "rows": [{"op": "performer", "case": "T3136", "kernel": "x", "us": 2.0}]}')
    assert sm.read_kernel_times(str(data))[0]["us"] == 2.0


def test_calibrate_finds_the_rate_that_made_the_times():
    """Kernel times made by the model at another WARP_IPC: the fit finds it (to its 1% grid), and kernels the
    model does not have are left out."""
    rows = [dict(op="o", case="c", direction="fwd", kernel=f"k{i}", warps=w, grid=[g, 1, 1], ctas_per_sm=c,
                 warp_instructions=n, roofline_us=0.0)
            for i, (w, g, c, n) in enumerate([(8, 1792, 1, 50e6), (4, 264, 2, 40e6), (4, 5, 6, 3e5)])]
    truth = 0.2
    measured = [dict(op="o", case="c", direction="fwd", kernel=r["kernel"],
                     us=1e6 * sm.occupancy_seconds(r["warp_instructions"], r["grid"][0], r["warps"],
                                                   r["ctas_per_sm"], truth)) for r in rows]
    measured.append(dict(op="o", case="c", direction="fwd", kernel="not_modelled", us=5.0))
    best, table = sm.calibrate(rows, measured)
    assert best == pytest.approx(truth, rel=0.01)
    assert [t["kernel"] for t in table] == ["k0", "k1", "k2"]
    assert table[0]["ratio"] == pytest.approx(sm.WARP_IPC / truth, rel=1e-3)
    with pytest.raises(ValueError, match="no measured kernel"):
        sm.calibrate(rows, measured[-1:])


def test_distinct_bytes_merges_aliases():
    kqv = torch.empty(4, 10, 12)
    k, q, v = torch.split(kqv, 4, dim=-1)
    assert sm.distinct_bytes([q]) == 4 * 10 * 4 * 4
    assert sm.distinct_bytes([k, q, v, kqv]) == kqv.numel() * 4
    assert sm.distinct_bytes([q, q[:, :5], torch.empty(3)]) == 4 * 10 * 4 * 4 + 12
    assert sm.distinct_bytes([torch.empty(1, 5).expand(7, 5)]) == 20


if __name__ == "__main__":
    _child(sys.argv[1])
