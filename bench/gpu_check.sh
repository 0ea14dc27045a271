#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA device (README, Performance, "On a GPU"):
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR default: bench/out/gpu-<date>
# 1. the CUDA tests (tests/gpu), 2. bench sections 6, 1 and 4 on CUDA (--rounds, default 9: GPU
# calls are short, and FGSM's ratio to torchattacks needs more than 5), 3. the default run on the
# GPU (name gpu-check-<date>; its report and stage times are copied to OUT_DIR), 4. the same run
# with the Ray Data model stages as task pools (--set scale.map_compute=tasks, name
# gpu-check-<date>-tasks): its stage times and report beside the first's, and how many lines
# from Ray's C++ core worker (`core_worker.cc`, e.g. "constructor arguments in the object store")
# reached each run's console: what task pools change on a one-GPU node (they are refused where a
# node has several GPUs, so `auto` stays on actors on GPU: runtime.map_compute).
# Each step has a time limit (seconds: GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S, GPU_CHECK_RUN_S) so that
# one hung step cannot take the whole lease; the exit status is the number of steps that failed.
# GPU_CHECK_STEPS picks steps (default "tests,bench,run,tasks"), e.g. to split them over calls
# with a per-call time limit.
set -u
cd "$(dirname "$0")/.." || exit 99
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: bench/gpu_check.sh: no CUDA device (torch.cuda.is_available() is False)" >&2; exit 2; }
stamp=$(date -u +%Y-%m-%d-%H%M)
out=${1:-bench/out/gpu-$stamp}
mkdir -p "$out" || exit 99
rounds=${GPU_CHECK_ROUNDS:-9}
export PYTHONUNBUFFERED=1
failed=0
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
say "GPU: $(head -1 "$out/gpu.txt")"

steps=",${GPU_CHECK_STEPS:-tests,bench,run,tasks},"
want() { [[ "$steps" == *",$1,"* ]]; }

# A default run on the GPU, name $1, extra arguments after it: log, report and stage times in $out.
pipeline() {
    local run=$1; shift
    timeout "${GPU_CHECK_RUN_S:-900}" python3 jobs/full_pipeline.py --name "$run" "$@" > "$out/$run.log" 2>&1 \
        || failed=$((failed + 1))
    mkdir -p "$out/$run"
    cp "runs/$run/report/report.md" "runs/$run/report/metrics.json" "$out/$run/" 2>/dev/null
    python3 - "$run" > "$out/$run/stages.txt" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(f"runs/{sys.argv[1]}/stages/*.json")):
    print(f"{os.path.basename(f)[:-5]:10s} {json.load(open(f)).get('duration_s', float('nan')):7.1f} s")
PY
    say "default run on the GPU ($run $*): $(grep -c . "$out/$run/stages.txt") stages timed, $(grep -c 'core_worker' "$out/$run.log") core_worker line(s) on the console"
    cat "$out/$run/stages.txt"
}

want tests && { timeout "${GPU_CHECK_TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider tests/gpu > "$out/tests-gpu.log" 2>&1 \
    || failed=$((failed + 1))
say "tests/gpu: $(tail -1 "$out/tests-gpu.log")"; }

want bench && { timeout "${GPU_CHECK_BENCH_S:-900}" python3 bench/run.py --sections 6,1,4 --device cuda --rounds "$rounds" \
    --out "$out/bench-gpu.json" > "$out/bench-gpu.log" 2>&1 || failed=$((failed + 1))
say "bench sections 6, 1, 4 on CUDA: $(tail -1 "$out/bench-gpu.log")"; }

want run && pipeline "gpu-check-$stamp"
want tasks && pipeline "gpu-check-$stamp-tasks" --set scale.map_compute=tasks
say "done: $failed step(s) failed; everything is in $out"
exit "$failed"
