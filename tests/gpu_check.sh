#!/usr/bin/env bash
# The device check: one command for anyone lent a CUDA GPU, one file to paste back.
#
#   bash tests/gpu_check.sh [OUT_FILE]        # OUT_FILE: default gpu_check.txt in the repo root
#
# Runs, in bf16 where a model is involved: the CUDA tests (tests/test_cuda.py), the demo, the quick bench,
# and the Llama-3-8B-shape bench (32 layers, random weights built on the GPU, 16 GB; about 22 GB at peak
# with coarse sparsity's copy of the kept MLP rows), eager and then with graph-captured one-token steps.
# Each step has its own time limit and all of them together stay under 8 minutes, so a hang costs only its
# step; a failed step does not stop the others. Everything each step prints is appended to OUT_FILE under
# the command that printed it, after the GPU's name and memory, torch's version and the date; the end lists
# PASS or FAIL per step. Exit status: 0 if every step passed, 1 if one failed, 2 if there is no CUDA device.
# PYTHON=... picks the interpreter (default: python).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 2
OUT=${1:-$ROOT/gpu_check.txt}
[[ $OUT == /* ]] || OUT=$PWD/$OUT             # a relative OUT_FILE is relative to where you ran this
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
BUDGET=470                                  # seconds for all steps: the step limits below add up to this

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA device: torch.cuda.is_available() is not True for $PY" >&2
    exit 2
fi

log() { echo "$*" | tee -a "$OUT"; }

{
    echo "=== sirius-min gpu_check, $(date -u '+%Y-%m-%d %H:%M:%S UTC')," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB')"
} 2>&1 | tee -a "$OUT"

# The Llama-3-8B-shape bench. Its projection needs an AAL per width: measured here on SmolLM2 (coarse,
# f = 0.5, K = 16, six plain-text questions), since a random-weight model's drafts mean nothing; the paper's
# 15.22 is shown for coarse w = 8 only.
read -r -d '' LLAMA3_8B <<'EOF'
import json, os, torch, bench
from tokenizers import Tokenizer
from convert_gguf import default_model_dir
from model import load_model
from sirius_min import sirius
QUESTIONS = ["What is 7 + 8?", "What is 23 - 9?", "What is 6 times 7?", "What is 12 + 19?",
             "Sara has 4 apples and buys 5 more. How many apples does she have?",
             "Ben has 9 coins and gives away 3. How many coins does he have left?"]
folder, widths = default_model_dir(), (1, 4, 8)
tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
small = load_model(folder, 1024, torch.bfloat16, "cuda")
aals = {}
for w in widths:
    advances = []
    for question in QUESTIONS:
        ids = torch.tensor(tok.encode(f"Question: {question}\nAnswer:").ids, device="cuda")
        advances += sirius(small, ids, 64, sparsity="coarse", keep=0.5, period=16, width=w).counted_advances
    aals[w] = sum(advances) / len(advances) if advances else float("nan")
print("AAL measured on SmolLM2-135M (bf16, coarse, f = 0.5, K = 16):", aals)
json.dump(aals, open(os.environ["GPU_CHECK_AALS"], "w"))      # for the compiled run below
del small
bench.bench_llama3_8b("cuda", torch.bfloat16, keep=0.5, period=16, widths=widths, aals=aals, reps=10,
                      sparsity="coarse", aal_source="SmolLM2-135M bf16, 6 questions, coarse, same w")
EOF

# The same with one-token steps and a chain's drafting graph-captured (torch.compile, reduce-overhead): the
# launch overhead gone, as in the paper's setting. A step of its own: compiling may be slow or fail.
read -r -d '' LLAMA3_8B_COMPILED <<'EOF'
import json, os, torch, bench
path = os.environ["GPU_CHECK_AALS"]
aals = {int(w): a for w, a in json.load(open(path)).items()} if os.path.getsize(path) else {}
bench.bench_llama3_8b("cuda", torch.bfloat16, keep=0.5, period=16, widths=(1,), aals=aals, reps=10,
                      sparsity="coarse", aal_source="SmolLM2-135M bf16, 6 questions, coarse, same w",
                      compile=True)
EOF
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

step "CUDA tests" 170 "$PY" -m pytest -q -s tests/test_cuda.py
step "demo" 35 "$PY" run.py --device cuda
step "quick bench" 65 "$PY" run.py bench --device cuda --quick
step "Llama-3-8B-shape bench" 70 "$PY" -c "$LLAMA3_8B"
step "Llama-3-8B-shape bench, compiled" 130 "$PY" -c "$LLAMA3_8B_COMPILED"

log ""
log "=== summary ($SECONDS s in all; figures above, in $OUT)"
failed=0
for i in "${!NAMES[@]}"; do
    log "${RESULTS[$i]}  ${NAMES[$i]}"
    [[ ${RESULTS[$i]} == PASS ]] || failed=1
done
exit $failed
