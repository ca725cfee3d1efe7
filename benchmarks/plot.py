"""PNG charts of benchmark results (matplotlib; without it, a message and exit code 0).

    python benchmarks/plot.py RESULTS [RESULTS ...] [--out DIR]

RESULTS: a ``benchmarks/gpu.sh`` output folder (its ``*.json`` files are read) or JSON files written by the
benchmark scripts' ``--out``. Charts go to ``--out`` (default: ``plots/`` inside the first folder, or beside
the first file): for the model benchmark, training and inference img/s, peak memory and the largest batch,
fused against reference; for the op benchmarks (soft split, performer, token transformer), time and peak
memory of every measured case, one bar per implementation and mode.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Callable, Optional

# fields of a result row that are measurements or bookkeeping, not part of what identifies a case
MEASURED = {"ms", "ms_p20", "ms_p80", "reps", "peak_mib", "peak_total_mib", "img_s", "roofline_ms", "roofline_pct",
            "roofline_img_s", "gflop_per_img", "compile_s", "status", "tries", "capped", "search_s", "max_batch",
            "impl", "mode", "gbps", "bw_frac", "act_mib"}


def load(paths: list[str]) -> dict[str, dict]:
    """benchmark name (the file's) -> payload ({meta, rows}) of every results JSON found under ``paths``."""
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    found = {}
    for path in files:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError) as e:
            print(f"plot.py: skipping {path}: {e}")
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list) and not name.endswith("_summary"):
            found[name] = payload  # (the op benchmarks' *_summary.json repeat their rows as ratios)
    return found


def case_label(row: dict) -> str:
    return " ".join(f"{k}={v}" if isinstance(v, int) else f"{v}" for k, v in row.items()
                    if k not in MEASURED and isinstance(v, (int, str)))


def series_label(row: dict) -> str:
    return f"{row.get('impl', '?')} {row.get('mode', 'eager')}"


def grouped_bars(plt, rows: list[dict], value: str, group: Callable[[dict], str], series: Callable[[dict], str],
                 title: str, ylabel: str, path: str, log: bool = False) -> Optional[str]:
    """One bar per series inside each group; rows without ``value`` are left out. Returns the path or None."""
    rows = [r for r in rows if r.get(value) is not None and r.get("status", "ok") == "ok"]
    if not rows:
        return None
    groups = list(dict.fromkeys(group(r) for r in rows))
    names = sorted(dict.fromkeys(series(r) for r in rows), key=lambda s: (not s.startswith("reference"), s))
    values = {(group(r), series(r)): r[value] for r in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(names)) * 0.6 + 2), 4.5))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((g, name), 0.0) for g in groups]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def model_charts(plt, rows: list[dict], out: str) -> list[Optional[str]]:
    bf16 = [r for r in rows if r.get("dtype") == "bf16"]
    label = lambda r: f"{r['model']} {r['img']}px B={r['batch']}"  # noqa: E731
    made = []
    for kind in ("train", "infer"):
        sel = [r for r in bf16 if r.get("kind") == kind]
        made.append(grouped_bars(plt, sel, "img_s", label, series_label,
                                 f"T2T-ViT {'training step' if kind == 'train' else 'inference'}, bf16 (higher is "
                                 "better)", "images / s", os.path.join(out, f"model_{kind}_img_s.png")))
    sel = [r for r in bf16 if r.get("kind") == "train" and r.get("mode") == "eager"]
    made.append(grouped_bars(plt, sel, "peak_mib", label, series_label,
                             "T2T-ViT training step peak memory, bf16 (lower is better)", "MiB above weights + state",
                             os.path.join(out, "model_train_peak_mib.png")))
    sel = [r for r in rows if r.get("kind") == "max_batch"]
    made.append(grouped_bars(plt, sel, "max_batch", lambda r: f"{r['model']} {r['img']}px {r['dtype']}",
                             series_label, "Largest training batch that fits (higher is better)", "batch",
                             os.path.join(out, "model_max_batch.png")))
    return made


def op_charts(plt, name: str, rows: list[dict], out: str) -> list[Optional[str]]:
    return [grouped_bars(plt, rows, "ms", case_label, series_label, f"{name}: time per call (lower is better)", "ms",
                         os.path.join(out, f"{name}_ms.png"), log=True),
            grouped_bars(plt, rows, "peak_mib", case_label, series_label,
                         f"{name}: peak memory per call (lower is better)", "MiB",
                         os.path.join(out, f"{name}_peak_mib.png"), log=True)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="gpu.sh output folders or results JSON files")
    p.add_argument("--out", default=None, help="folder for the PNG files")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed, so no charts were drawn (pip install matplotlib, then run "
              "this again); the CSV and JSON results are complete without it.")
        return 0
    found = load(args.results)
    if not found:
        print(f"plot.py: no results JSON (with a 'rows' list) in {' '.join(args.results)}")
        return 1
    first = args.results[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first)), "plots")
    os.makedirs(out, exist_ok=True)
    made = []
    for name, payload in found.items():
        rows = payload["rows"]
        made += model_charts(plt, rows, out) if name == "model" else op_charts(plt, name, rows, out)
    made = [m for m in made if m]
    for m in made:
        print(f"wrote {m}")
    if not made:
        print("plot.py: the results hold no successful measurement to draw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
