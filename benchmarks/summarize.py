"""Turn the output folder of a ``benchmarks/gpu.sh`` run into ``<device>.md``, judging every target.

    python benchmarks/summarize.py OUT_DIR [--publish]   # writes OUT_DIR/<device>.md and OUT_DIR/summary.txt
    python benchmarks/summarize.py --write-meta OUT_DIR  # gpu.sh's first step: OUT_DIR/meta.json

``--publish`` also copies the page to ``benchmarks/results/<device>.md``. The page holds the device, driver,
torch/triton versions, date and commit (from ``meta.json``), the targets with pass/miss, gpu.sh's steps, the GPU
test result and every benchmark table. Nothing is judged from a missing number: a target without its
measurement says "not measured" and why.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402

BENCHES = ("soft_split", "performer", "kernel_times", "token_transformer", "model")  # gpu.sh's OUT/<name>.json


# ---------------------------------------------------------------------------------------------------------
# meta.json
# ---------------------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def collect_meta() -> dict:
    """Device, driver, versions, date and commit of this machine and checkout."""
    import torch

    meta: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    commit = os.environ.get("T2T_FAST_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    meta["commit"] = commit or "unknown (no .git; set T2T_FAST_COMMIT)"
    if not os.environ.get("T2T_FAST_COMMIT") and commit:
        meta["dirty"] = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        meta["driver"] = nvidia_driver()
    else:
        meta.update(device="cpu (no CUDA device)", driver=None)
    return meta


def nvidia_driver() -> str:
    """The NVIDIA driver version, from nvidia-smi or else the kernel module's /proc entry."""
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        return smi.splitlines()[0].strip()
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+([0-9.]+)", f.read())
        return found.group(1) if found else "unknown"
    except OSError:
        return "unknown"


def write_meta(out: str) -> None:
    """``out/meta.json``: ``collect_meta()`` and the device's measured copy bandwidth and matmul rates."""
    import torch

    os.makedirs(out, exist_ok=True)
    meta = collect_meta()
    if torch.cuda.is_available():
        meta["peaks"] = common.roofline_peaks(torch.device("cuda", torch.cuda.current_device()))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------------------
def load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_run(out: str) -> dict:
    """meta, steps, pytest counts and each benchmark's rows of one gpu.sh output folder."""
    run = {"meta": load_json(os.path.join(out, "meta.json")) or {}, "benches": {}, "summaries": {}}
    for name in BENCHES:
        payload = load_json(os.path.join(out, f"{name}.json"))
        if payload is not None:
            run["benches"][name] = payload
        summary = load_json(os.path.join(out, f"{name}_summary.json"))  # the op benchmarks' per-shape verdicts
        if summary is not None:
            run["summaries"][name] = summary
    steps = []
    try:
        with open(os.path.join(out, "steps.tsv")) as f:
            lines = f.read().splitlines()
        steps = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:] if line.strip()]
    except (OSError, IndexError):
        pass
    run["steps"] = steps
    run["pytest"] = pytest_counts(os.path.join(out, "pytest_gpu.xml"))
    return run


def pytest_counts(path: str) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def rows_of(run: dict, bench: str) -> list[dict]:
    """The rows of a benchmark to judge targets on: none from a CPU run (``--smoke``)."""
    payload = run["benches"].get(bench) or {}
    return [] if on_cpu(payload) else list(payload.get("rows", []))


def unjudged(run: dict, bench: str) -> Optional[str]:
    """Why a benchmark's targets cannot be judged at all (None when they can)."""
    if bench not in run["benches"]:
        return f"no {bench}.json"
    return "a CPU --smoke run only" if on_cpu(run["benches"][bench]) else None


def on_cpu(payload: dict) -> bool:
    return (payload.get("meta") or {}).get("device") == "cpu"


def ok(row: Optional[dict]) -> bool:
    return bool(row) and row.get("status", "ok") == "ok"


def find(rows: list[dict], **match) -> Optional[dict]:
    """The first row whose fields equal ``match`` (None when absent)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    target: str
    goal: str
    measured: str
    verdict: str  # 'PASS', 'MISS', 'not measured', 'inconclusive'


def judge(value: Optional[float], goal: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    return "PASS" if (value >= goal if higher_is_better else value <= goal) else "MISS"


def ratio_verdict(target: str, goal_text: str, goal: float, higher: bool, fused: Optional[dict],
                  base: Optional[dict], key: str, invert: bool, what: str) -> Verdict:
    """A fused/reference ratio of ``key`` (``invert``: base/fused, for times) judged against ``goal``."""
    if not ok(fused) or not ok(base) or not fused.get(key) or not base.get(key):
        why = "; ".join(f"{name}: {(r or {}).get('status', 'no row')}" for name, r in (("fused", fused),
                                                                                       ("reference", base))
                        if not ok(r) or not (r or {}).get(key))
        return Verdict(target, goal_text, f"not measured ({why})", "not measured")
    value = base[key] / fused[key] if invert else fused[key] / base[key]
    return Verdict(target, goal_text, f"{value:.2f}x ({what.format(f=fused[key], b=base[key])})",
                   judge(value, goal, higher))


def op_targets(run: dict, bench: str, label: str, speed_goals: tuple[float, float],
               mem_goal: Optional[float]) -> list[Verdict]:
    """Soft split / performer: fused fwd+bwd against the eager and the compiled reference (and memory)."""
    rows = [r for r in rows_of(run, bench) if r.get("direction") == "fwd+bwd"]
    verdicts = []
    for goal, mode in zip(speed_goals, ("eager", "compile")):
        pairs = op_pairs(rows, mode)
        name = f"{label} fwd+bwd vs {'eager' if mode == 'eager' else 'compiled'} reference"
        verdicts.append(worst_ratio(name, f">= {goal:g}x", goal, pairs, _speedup, higher=True))
    if mem_goal is not None:
        pairs = op_pairs(rows, "eager")
        verdicts.append(worst_ratio(f"{label} fwd+bwd peak memory vs reference", f"<= 1/{round(1 / mem_goal)}",
                                    mem_goal, pairs, _memory_ratio, higher=False))
    return verdicts


def _speedup(fused: dict, base: dict) -> tuple[Optional[float], str]:
    """base time / fused time (both from CUDA graphs, or both eager: ``common.speedup``) and which."""
    return common.speedup(base, fused), "GPU time" if fused.get("graph_ms") and base.get("graph_ms") else \
        "eager calls"


def _memory_ratio(fused: dict, base: dict) -> tuple[Optional[float], str]:
    """fused peak memory / the reference's."""
    return common.ratio(fused.get("peak_mib"), base.get("peak_mib")), ""


def op_pairs(rows: list[dict], ref_mode: str) -> list[tuple[dict, dict, str]]:
    """(fused eager row, reference row in ``ref_mode``, case label) for every shape measured both ways."""
    ident = lambda r: tuple(sorted((k, v) for k, v in r.items() if k in CASE_KEYS))  # noqa: E731
    fused = {ident(r): r for r in rows if r.get("impl") == "fused" and r.get("mode") == "eager"}
    pairs = []
    for r in rows:
        if r.get("impl") == "reference" and r.get("mode") == ref_mode and ident(r) in fused:
            pairs.append((fused[ident(r)], r, ", ".join(f"{k}={v}" for k, v in ident(r))))
    return pairs


CASE_KEYS = ("stage", "img", "batch", "dtype", "B", "T")  # what identifies a shape in the op benchmarks' rows


def worst_ratio(target: str, goal_text: str, goal: float, pairs: list[tuple[dict, dict, str]],
                ratio: Callable[[dict, dict], tuple[Optional[float], str]], higher: bool) -> Verdict:
    """Judge the least favourable of several shapes (every measured shape must meet the goal): ``ratio(fused,
    base)`` gives a shape's value (None when unmeasured) and a note for its label; ``higher``: higher is better
    (speedups), else lower (memory ratios)."""
    values = []
    for fused, base, label in pairs:
        if ok(fused) and ok(base):
            value, note = ratio(fused, base)
            if value:
                values.append((value, f"{label} ({note})" if note else label))
    if not values:
        return Verdict(target, goal_text, "not measured (no fused/reference pair)", "not measured")
    worst = min(values) if higher else max(values)
    spread = f"{min(v for v, _ in values):.2f}x..{max(v for v, _ in values):.2f}x over {len(values)} shapes; " \
        if len(values) > 1 else ""
    return Verdict(target, goal_text, f"{spread}worst {worst[0]:.2f}x at {worst[1]}", judge(worst[0], goal, higher))


def model_targets(run: dict) -> list[Verdict]:
    rows = rows_of(run, "model")
    out = []
    key = dict(model="t2t_vit_14", img=224, dtype="bf16", batch=128, kind="train")
    fe, re_ = find(rows, impl="fused", mode="eager", **key), find(rows, impl="reference", mode="eager", **key)
    fc, rc = find(rows, impl="fused", mode="compile", **key), find(rows, impl="reference", mode="compile", **key)
    out.append(ratio_verdict("T2T-ViT-14 train step img/s (B=128, bf16, 224) vs eager reference", ">= 1.3x", 1.3,
                             True, fe, re_, "img_s", False, "{f:.0f} vs {b:.0f} img/s"))
    fused_best = fc if ok(fc) else fe
    v = ratio_verdict("T2T-ViT-14 train step img/s (B=128, bf16, 224) vs compiled reference", ">= 1.1x", 1.1,
                      True, fused_best, rc, "img_s", False, "{f:.0f} vs {b:.0f} img/s")
    if fused_best is fe and ok(rc):
        v.measured += "; fused eager (fused compiled failed or not run)"
    out.append(v)
    out.append(ratio_verdict("T2T-ViT-14 train step peak memory (B=128, bf16, 224) vs reference", "<= 0.7x", 0.7,
                             False, fe, re_, "peak_mib", False, "{f:.0f} vs {b:.0f} MiB"))
    out.append(t14_memory(rows))
    lbs = [r for r in rows if r.get("kind") == "max_batch" and r.get("img") == 384]
    models = sorted({r["model"] for r in lbs})
    for model in models or ["t2t_vit_14"]:
        out.append(max_batch_verdict(model, find(lbs, model=model, impl="fused"),
                                     find(lbs, model=model, impl="reference")))
    return out


def t14_memory(rows: list[dict]) -> Verdict:
    """T2T-ViT_t-14 training peak memory at 224 (B=128, else the largest batch measured both ways)."""
    name = "T2T-ViT_t-14 train step peak memory (bf16, 224) vs reference"
    cands = [r for r in rows if r.get("model") == "t2t_vit_t_14" and r.get("img") == 224 and r.get("kind") == "train"
             and r.get("mode") == "eager" and r.get("dtype") == "bf16"]
    batches = sorted({r["batch"] for r in cands}, reverse=True)
    pairs = [(b, find(cands, impl="fused", batch=b), find(cands, impl="reference", batch=b)) for b in batches]
    for batch, f, b in pairs:
        if ok(f) and ok(b) and f.get("peak_mib") and b.get("peak_mib"):
            return ratio_verdict(f"{name}, B={batch}", "<= 1/3", 1 / 3, False, f, b, "peak_mib", False,
                                 "{f:.0f} vs {b:.0f} MiB")
    for batch, f, b in pairs:
        if ok(f) and b and b.get("status") == "out of memory":
            return Verdict(f"{name}, B={batch}", "<= 1/3", f"reference out of memory, fused {f['peak_mib']:.0f} MiB",
                           "inconclusive")
    return Verdict(name, "<= 1/3", "not measured", "not measured")


def max_batch_verdict(model: str, fused: Optional[dict], base: Optional[dict]) -> Verdict:
    name = f"{model} largest training batch at 384 px vs reference"
    if not ok(fused) or not ok(base) or not fused.get("max_batch") or not base.get("max_batch"):
        why = "; ".join(f"{n}: {(r or {}).get('status', 'no row')}" for n, r in (("fused", fused), ("reference", base)))
        return Verdict(name, ">= 2x", f"not measured ({why})", "not measured")
    value = fused["max_batch"] / base["max_batch"]
    text = f"{value:.2f}x ({fused['max_batch']}{'+' if fused.get('capped') else ''} vs " \
           f"{base['max_batch']}{'+' if base.get('capped') else ''})"
    verdict = judge(value, 2.0, True)
    if base.get("capped") and verdict == "PASS":
        verdict = "inconclusive"  # the reference's number is only a lower bound
    if fused.get("capped") and verdict == "MISS":
        verdict = "inconclusive"
    return Verdict(name, ">= 2x", text, verdict)


def all_targets(run: dict) -> list[Verdict]:
    verdicts = []
    for bench, targets in (("soft_split", op_targets(run, "soft_split", "soft split", (4.0, 2.0), None)),
                           ("performer", op_targets(run, "performer", "performer", (5.0, 2.0), 1 / 8)),
                           ("model", model_targets(run))):
        why = unjudged(run, bench)
        for v in targets:
            if why:
                v.measured, v.verdict = f"not measured ({why})", "not measured"
        verdicts += targets
    return verdicts


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def bench_tables(name: str, run: dict) -> list[tuple[str, list[dict]]]:
    """The comparison tables of one benchmark: the script's own (model, token transformer), the op benchmarks'
    per-shape summaries, or the raw rows when neither can be had."""
    rows = run["benches"][name].get("rows", [])
    if name in run["summaries"]:
        return [(f"{name}: per-shape summary (`{name}_summary.json`)", run["summaries"][name].get("rows", []))]
    if name in ("model", "token_transformer"):
        try:
            module = importlib.import_module(f"bench_{name}")
            return module.tables(rows)
        except Exception as e:  # noqa: BLE001  (e.g. t2t_fast not importable: fall back to the rows)
            print(f"summarize: raw rows for {name} ({common.describe_error(e)})")
    return [(f"{name}: all rows", rows)]


def render(run: dict, verdicts: list[Verdict]) -> str:
    meta = run["meta"]
    peaks = meta.get("peaks") or {}
    commit = meta.get("commit", "unknown") + (" (with uncommitted changes)" if meta.get("dirty") else "")
    facts = [("device", f"{meta.get('device', 'unknown')} ({meta.get('memory_gib', '?')} GiB, "
                        f"{meta.get('sms', '?')} SMs, {meta.get('capability', '?')})"),
             ("driver", meta.get("driver")), ("CUDA (torch build)", meta.get("cuda")), ("torch", meta.get("torch")),
             ("triton", meta.get("triton")), ("python", meta.get("python")), ("date", meta.get("date")),
             ("commit", commit), ("TF32 matmul", meta.get("tf32_matmul")),
             ("measured peaks", ", ".join(f"{k} {v:.4g}" for k, v in peaks.items() if isinstance(v, (int, float))))]
    parts = [f"# t2t-fast benchmarks on {meta.get('device', 'unknown device')}\n\n",
             "Made by `benchmarks/gpu.sh` and `benchmarks/summarize.py`; `benchmarks/results/README.md` says how "
             "each number is taken.\n\n",
             common.markdown_table([{"": k, "value": v} for k, v in facts], ["", "value"]),
             "\n## Targets\n\n",
             common.markdown_table([v.__dict__ for v in verdicts], ["target", "goal", "measured", "verdict"])]
    if run["steps"]:
        parts += ["\n## gpu.sh steps (wall seconds)\n\n", common.markdown_table(run["steps"])]
    if run["pytest"]:
        parts += ["\n## pytest -m gpu\n\n", common.markdown_table([run["pytest"]])]
    for name in run["benches"]:
        parts.append(f"\n## {name}\n\nAll rows: `{name}.json`, `{name}.csv`.\n")
        for title, table in bench_tables(name, run):
            parts += [f"\n{title}\n\n", common.markdown_table(table)]
    return "".join(parts)


def summarize(out: str, publish: bool) -> str:
    run = load_run(out)
    verdicts = all_targets(run)
    page = render(run, verdicts)
    slug = device_slug(run["meta"].get("device", "unknown"))
    path = os.path.join(out, f"{slug}.md")
    with open(path, "w") as f:
        f.write(page)
    summary = "Targets\n\n" + common.markdown_table([v.__dict__ for v in verdicts],
                                                     ["verdict", "target", "goal", "measured"])
    cpu = [name for name, payload in run["benches"].items() if on_cpu(payload)]
    if cpu:
        summary += f"\n{', '.join(cpu)}: measured on the CPU (--smoke), so not judged\n"
    if run["pytest"]:
        p = run["pytest"]
        summary += (f"\npytest -m gpu: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                    f"{p['skipped']} skipped\n")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"wrote {path}")
    if publish:
        dest = os.path.join(HERE, "results", f"{slug}.md")
        shutil.copyfile(path, dest)
        print(f"published {dest}")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder gpu.sh wrote")
    p.add_argument("--write-meta", action="store_true", help="collect meta.json (device, versions, commit) only")
    p.add_argument("--publish", action="store_true", help="also copy the page to benchmarks/results/")
    args = p.parse_args(argv)
    if args.write_meta:
        write_meta(args.out)
        return 0
    if not os.path.isdir(args.out):
        p.error(f"{args.out} is not a folder")
    summarize(args.out, args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
