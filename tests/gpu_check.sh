#!/usr/bin/env bash
# The device check: one command for anyone lent a CUDA GPU, one file to paste back.
#
#   bash tests/gpu_check.sh [OUT_FILE]              # on a CUDA GPU; OUT_FILE: default gpu_check.txt
#   bash tests/gpu_check.sh --dry-run [OUT_FILE]    # the same steps on a CPU, tiny shapes (CI runs this)
#
# Steps: the prerequisites of Inductor's CUDA graphs (one line each); the CUDA tests (tests/test_cuda.py,
# fp32 and bf16) that need no compiling; the demo; every captured graph and the bytes it would copy per replay
# (tests/gpu_check.py capture); AALs measured on SmolLM2 for the bench's projection; the Llama-3-8B-shape
# bench (32 layers, random bf16 weights built on the GPU, 16 GB of them; the step prints its peak memory);
# then, in one step with its own 300 s (cold compiles), the compiled CUDA tests and the 8B-shape bench with
# every decode pass captured. Outside the CUDA tests every model runs in bf16. Each step has its own time
# limit and all of them stay under 8 minutes, so a hang costs only its step. A failed step does not stop the
# others, except that a failed prerequisites step skips the compiled one (recorded as FAIL: not run).
# Everything each step prints is appended to OUT_FILE under the command that printed it, after the GPU's
# name, torch's version and the date, with TORCH_LOGS=recompiles,perf_hints (recompiles, CUDA-graph skips);
# the end lists PASS or FAIL per step.
# The dry run runs on the CPU, in fp32, what of these steps a CPU can, to catch import and wiring errors
# before a device run: not the prerequisites; tests/test_cuda.py collected only (its imports, not its test
# bodies); the demo and the AALs on the full SmolLM2-135M with a few tokens; the capture table on a 2-layer
# stand-in of the 8B shape, through graphs.InputLog; the bench at that stand-in shape, eager and then compiled
# with torch.compile's "aot_eager" backend instead of Inductor. The CUDA tests' bodies, Triton kernels,
# CUDA-graph replays and times only a device run exercises. Exit status: 0 if every step passed, 1 if one
# failed, 2 if there is no CUDA device (real run) or the arguments are wrong. PYTHON=... picks the interpreter
# (default: python).
set -u
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
if [[ ${1:-} == -* ]]; then echo "error: usage: bash tests/gpu_check.sh [--dry-run] [OUT_FILE]" >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 2
OUT=${1:-$ROOT/gpu_check.txt}
[[ $OUT == /* ]] || OUT=$PWD/$OUT             # a relative OUT_FILE is relative to where you ran this
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
BUDGET=475                                  # seconds for all steps: the real run's step limits add up to this
export TORCH_LOGS=recompiles,perf_hints     # torch.compile's recompiles and CUDA-graph skips, into OUT

if (( ! DRY )) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "error: no CUDA device: torch.cuda.is_available() is not True for $PY (a CPU? bash $0 --dry-run)" >&2
    exit 2
fi
: > "$OUT" 2>/dev/null || { echo "error: cannot write $OUT" >&2; exit 2; }

log() { echo "$*" | tee -a "$OUT"; }

{
    echo "=== sirius-min gpu_check$( ((DRY)) && echo ' --dry-run (CPU, tiny shapes)'), " \
         "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    (( DRY )) || nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} 2>&1 | tee -a "$OUT"

GPU_CHECK_AALS=$(mktemp) || exit 2
export GPU_CHECK_AALS
trap 'rm -f "$GPU_CHECK_AALS"' EXIT

NAMES=() RESULTS=()
step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, log everything, record PASS/FAIL
    local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc verdict=PASS
    shift 2
    (( limit > left )) && limit=$left
    log ""
    log "=== $name: \$ $*"
    if (( left < 10 )); then
        verdict="FAIL (not run: the time budget is spent)"
    else
        log "=== $(date -u '+%H:%M:%S UTC'), limit ${limit} s"
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
        rc=${PIPESTATUS[0]}
        if (( rc == 124 || rc == 137 )); then
            verdict="FAIL (time limit)"
        elif (( rc != 0 )); then
            verdict="FAIL (exit $rc)"
        fi
    fi
    log "=== $name: $verdict in $((SECONDS - start)) s"
    NAMES+=("$name") RESULTS+=("$verdict")
}
skip() {  # skip NAME WHY: a step that cannot run, recorded as failed
    log ""
    log "=== $1: FAIL (not run: $2)"
    NAMES+=("$1") RESULTS+=("FAIL (not run: $2)")
}

G="$PY tests/gpu_check.py"
if (( DRY )); then
    step "CUDA tests (collected only)" 20 "$PY" -m pytest -q --collect-only tests/test_cuda.py
    step "demo" 40 "$PY" run.py --max-new-tokens 8
    step "captured graphs" 40 $G capture --dry-run
    step "AAL on SmolLM2" 40 $G aal --dry-run
    step "Llama-3-8B-shape bench" 30 $G bench --dry-run
    step "compiled" 60 $G bench --dry-run --compile
else
    step "prerequisites" 10 $G prerequisites
    [[ ${RESULTS[-1]} == PASS ]] && compiled_ok=1 || compiled_ok=0
    step "CUDA tests" 70 "$PY" -m pytest -q -s tests/test_cuda.py -k "not compiled"
    step "demo" 20 "$PY" run.py --device cuda
    step "captured graphs" 15 $G capture
    step "AAL on SmolLM2" 15 $G aal
    step "Llama-3-8B-shape bench" 45 $G bench
    if (( compiled_ok )); then
        step "compiled (cold compiles)" 300 bash -c \
            "$PY -m pytest -q -s tests/test_cuda.py -k compiled && $G bench --compile"
    else
        skip "compiled (cold compiles)" "a prerequisite is missing, see the first step"
    fi
fi

log ""
log "=== summary ($SECONDS s in all; figures above, in $OUT)"
failed=0
for i in "${!NAMES[@]}"; do
    log "${RESULTS[$i]}  ${NAMES[$i]}"
    [[ ${RESULTS[$i]} == PASS ]] || failed=1
done
exit $failed
