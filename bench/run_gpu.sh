#!/usr/bin/env bash
# Run the GPU benchmarks on one GPU, the most important first, each step under its own time limit, then print
# every table. One JSON per benchmark, run_gpu.log and summary.md land in $OUT (default runs/bench_gpu).
#
#   bench/run_gpu.sh part1|part2|part3|all|smoke
#
#   part1  P1 gate-search memory (8B; 8K, 32K), then P3/P4 hybrid decode, cache bytes and prefill (8B; 8K-128K)
#   part2  P2 branch cost (8B; 8K, 32K), P7 selection cost (1B; 8K), the kernel table (4K-128K)
#   part3  P5 distill-step MFU (8B; 8K), the estimator check (8K, 16K, 32K), P6 longest context (distill, then
#          gate search); its P6 searches stop at an internal time budget and report a lower bound if cut short
#   smoke  every step with --smoke (tiny shape, CPU, seconds): checks this script and the environment
# Each part is planned to take ~6 minutes and must fit a 10-minute call: all its steps share one deadline,
# BENCH_DEADLINE_S seconds from the start (default 570; 1800 for all); a step that would pass it is cut short (its JSON keeps the
# rows measured so far) and the steps after it are skipped. BENCH_SHAPE=llama3-1b swaps the 8B shape for a quick run.
# Without fla on the node, wheelhouse/ (scripts/build_wheelhouse.sh) is installed into /tmp first, offline.
# Triton's cache (fla's autotuning, ~100 s per new head size) goes to .bench_cache/triton; BENCH_SAVE_TRITON_CACHE=1
# also writes $OUT/triton_cache.tgz, which a later fresh machine restores from .bench_cache/triton_cache.tgz.
set -uo pipefail

PART=${1:-}
case "$PART" in
    part1|part2|part3|all|smoke) ;;
    *) echo "usage: bench/run_gpu.sh part1|part2|part3|all|smoke" >&2; exit 2 ;;
esac
SMOKE=()
[[ $PART == smoke ]] && SMOKE=(--smoke)
STARTED=$(date +%s)
DEADLINE=$(( STARTED + ${BENCH_DEADLINE_S:-$([[ $PART == all ]] && echo 1800 || echo 570)} ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/runs/bench_gpu}
mkdir -p "$OUT"
LOG=$OUT/run_gpu.log
SHAPE=${BENCH_SHAPE:-llama3-8b}
source "$ROOT/bench/gpu_env.sh"
STATUS=()

prepare_node
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers
print(f"== {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'}; "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
EOF

run_step() {  # name limit_s module [args...]: run one benchmark, cut at its limit or at the shared deadline
    local name=$1
    step_limit "$name" "$2" 20 || return
    local limit=$LIMIT
    shift 2
    log "== $name (limit ${limit}s): $PYTHON -m $* ${SMOKE[*]+${SMOKE[*]}} --out $OUT"
    local start rc
    start=$(date +%s)
    # SIGINT first: python unwinds (the JSON already holds every finished row), SIGKILL 15 s later
    timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" -m "$@" ${SMOKE[@]+"${SMOKE[@]}"} --out "$OUT" 2>&1 \
        | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    STATUS+=("$name: exit $rc after $(( $(date +%s) - start ))s$( ((rc == 124)) && echo ' (time limit)')")
}

wants() { [[ $PART == "$1" || $PART == all || $PART == smoke ]]; }  # does this run include part $1

if wants part1; then
    run_step "P1 gate_memory" 270 bench.gate_memory --shape "$SHAPE" --lengths 8K,32K
    run_step "P3/P4 hybrid_inference" 300 bench.hybrid_inference --shape "$SHAPE" \
        --decode-lengths 32K,128K --decode-batches 1,8 --prefill-lengths 8K,32K,64K,128K
fi
if wants part2; then
    run_step "P2 branch_cost" 240 bench.branch_cost --shape "$SHAPE" --lengths 8K,32K --iters 2
    run_step "P7 selection_cost" 200 bench.selection_cost --shape llama3-1b --seq-len 8K --num-batches 4
    run_step "attention_kernels" 120 bench.attention_kernels --lengths 4K,8K,16K,32K,64K,128K --naive-max-len 16K
fi
if wants part3; then
    # one process: fla autotunes once (~100 s); P6 starts no probe predicted to end after --time-budget-s
    run_step "P5/P6 distill_step" 420 bench.distill_step --shape "$SHAPE" --length 8K --warmup 2 --iters 3 \
        --estimate-lengths 8K,16K,32K --gate-lengths 8K,32K --p6-limit 512K --time-budget-s 360
fi

save_triton_cache
"$PYTHON" -m bench.summary "$OUT" > "$OUT/summary.md"
{
    echo
    cat "$OUT/summary.md"
    echo
    echo "== run_gpu.sh $PART: $(( $(date +%s) - STARTED ))s in all"
    printf '   %s\n' "${STATUS[@]}"
} | tee -a "$LOG"
