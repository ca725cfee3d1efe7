#!/usr/bin/env bash
# One command on a GPU machine (no network needed; torch, triton, ninja and pybind11 installed):
#
#     bash benchmarks/gpu.sh OUT_DIR            # quick: finishes in ~9 minutes on an H100
#     T2T_GPU_FULL=1 bash benchmarks/gpu.sh OUT_DIR   # every size, batch and mode (much longer)
#
# installs t2t-fast with its CUDA extension, runs `pytest -m gpu` and every benchmark, writes their logs,
# CSV and JSON files, meta.json (device, driver, versions, date, commit) and <device>.md into OUT_DIR, and
# prints a summary last. A failing or timed-out step is recorded and the run goes on.
# Environment: T2T_GPU_DEADLINE (seconds for the whole run, default 540), T2T_FAST_COMMIT (the commit, when
# the tree has no .git), PYTHON (default python3).
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEADLINE=${T2T_GPU_DEADLINE:-540}
RESERVE=25  # seconds kept for the summary at the end
if [ "${T2T_GPU_FULL:-0}" = "1" ]; then  # every size, batch and mode: no deadline to speak of
    MODE=() DEADLINE=${T2T_GPU_DEADLINE:-100000} SCALE=40
else
    MODE=(--quick) SCALE=1  # SCALE multiplies every step's time limit
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
START=$SECONDS
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tlimit\n' > "$STEPS"

# run_step NAME LIMIT CMD...: run CMD with a time limit (cut to what is left before the deadline), log to
# logs/NAME.log, print its tail, record status and wall time in steps.tsv.
run_step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local left=$((DEADLINE - RESERVE - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped (deadline)\t0\t0\n' "$name" >> "$STEPS"
        echo "=== $name: skipped, the ${DEADLINE}s deadline is near"
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ $rc -eq 130 ]; then status="timeout"
    elif [ $rc -ne 0 ]; then status="FAIL (exit $rc)"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$limit" >> "$STEPS"
    tail -n "${TAIL_LINES:-25}" "$OUT/logs/$name.log"
    echo "=== $name: $status in ${took}s"
}

left_for() {  # seconds left before the deadline, minus a margin, for steps that budget themselves
    echo $((DEADLINE - RESERVE - (SECONDS - START) - $1))
}

run_step meta 60 "$PY" benchmarks/summarize.py --write-meta "$OUT"
if ! grep -q '"capability"' "$OUT/meta.json" 2>/dev/null; then
    echo "=== WARNING: torch sees no CUDA device here: the benchmarks will only say so (see logs/meta.log)"
fi
run_step install 240 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
if ! grep -q $'^install\tok' "$STEPS"; then  # keep the Triton and reference paths measurable
    run_step install_no_ext 60 env T2T_FAST_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps \
        --no-index -e .
fi
run_step backends 60 "$PY" -c "import t2t_fast; print(t2t_fast.backends())"
run_step pytest_gpu 150 "$PY" -m pytest -m gpu -q -rfEs --durations=15 --junitxml="$OUT/pytest_gpu.xml"
# each benchmark writes OUT/<name>.json and OUT/<name>.csv (the op benchmarks also <name>_summary.*)
run_step bench_soft_split 90 "$PY" benchmarks/bench_soft_split.py ${MODE[@]+"${MODE[@]}"} --out "$OUT"
run_step bench_performer 75 "$PY" benchmarks/bench_performer.py ${MODE[@]+"${MODE[@]}"} --out "$OUT"
run_step kernel_times 45 "$PY" benchmarks/kernel_times.py --out "$OUT"
# bench_model stops starting measurements once its budget is spent, so it ends on its own; the token
# transformer's 60 s (its eager rows in quick mode) are kept for after it
run_step bench_model 100000 "$PY" benchmarks/bench_model.py ${MODE[@]+"${MODE[@]}"} --out "$OUT" \
    --budget "$(left_for 105)"
run_step bench_token_transformer 60 "$PY" benchmarks/bench_token_transformer.py ${MODE[@]+"${MODE[@]}"} --out "$OUT"
if "$PY" -c "import matplotlib" > /dev/null 2>&1; then
    run_step plot 60 "$PY" benchmarks/plot.py "$OUT" --out "$OUT/plots"
fi
RESERVE=0 TAIL_LINES=1 run_step summary 60 "$PY" benchmarks/summarize.py "$OUT"
echo
echo "=== summary ($((SECONDS - START))s in all; everything is in $OUT)"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
echo
cat "$OUT/summary.txt" 2>/dev/null || echo "(no summary.txt: see $OUT/logs/summary.log)"
