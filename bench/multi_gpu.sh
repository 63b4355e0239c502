#!/usr/bin/env bash
# Multi-GPU verification (issue 8) on one host with NPROC GPUs (default 2), the most important step first, each
# step its own torchrun launch under its own time limit, so a step that fails, hangs or runs out of memory keeps
# its finished rows and leaves the next step a clean start. Results: $OUT/multi_gpu_<n>_<step>.json (rewritten
# after every row), $OUT/multi_gpu.md (every table) and $OUT/multi_gpu.log (default OUT: runs/multi_gpu).
#
#   bench/multi_gpu.sh [gpu|smoke]
#
#   gpu    1 nccl: all_reduce/all_to_all values and 256 MiB bus bandwidth; 2 gate: gate search on the 8B shape under
#          ZeRO-3 at 8K; 3 sp: LoRA distill of the 8B hybrid with Ulysses SP, loss vs no SP at 8K, steps at 32K and
#          128K; 4 tp: distill (trainable linear) of the 1B hybrid with TP, loss and grad norm vs TP=1 at 8K
#   smoke  the same steps with --smoke in ONE launch (tiny shapes, CPU, gloo): checks this script and the code
# All launches share one deadline, BENCH_DEADLINE_S seconds from the start (default 520, for a 9-minute call);
# a launch that would pass it is cut short and the ones after it are skipped. python -m bench.multi_gpu --help: the steps.
# MULTI_GPU_STEPS picks launches ("sp tp": only those); BENCH_SAVE_TRITON_CACHE=1 writes $OUT/triton_cache.tgz
# (if under 15 MiB) to put at .bench_cache/triton_cache.tgz for the next fresh machine, as run_gpu.sh does.
# MULTI_GPU_ARGS adds arguments to every launch (e.g. "--gate-lengths 8K,32K"; "--smoke" runs the gpu sequence of
# launches on tiny shapes, which is how the launch logic was checked on CPU).
# Without fla on the node, wheelhouse/ is installed into /tmp/flashmorph-site first, offline (as run_gpu.sh does).
# fla autotunes at the first call of a kernel shape (~100 s); its results are cached on disk in TRITON_CACHE_DIR
# (.bench_cache/triton), shared by the launches, and restored from .bench_cache/triton_cache.tgz when present.
set -uo pipefail

MODE=${1:-gpu}
case "$MODE" in
    gpu|smoke) ;;
    *) echo "usage: bench/multi_gpu.sh [gpu|smoke]" >&2; exit 2 ;;
esac
STARTED=$(date +%s)
DEADLINE=$(( STARTED + ${BENCH_DEADLINE_S:-520} ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/runs/multi_gpu}
mkdir -p "$OUT"
LOG=$OUT/multi_gpu.log
NPROC=${NPROC:-2}
STEPS=${MULTI_GPU_STEPS:-nccl gate sp tp}  # gpu mode: which launches run (e.g. "tp" to rerun only the last)
source "$ROOT/bench/gpu_env.sh"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink multicast off, as the device notes ask
STATUS=()

if [[ $MODE == gpu ]]; then
    prepare_node
    { nvidia-smi -L; nvidia-smi topo -m; } 2>&1 | tee -a "$LOG"
    log "== install and checks: $(( $(date +%s) - STARTED ))s"
fi

PID_DIR=$(mktemp -d)
export MULTI_GPU_PID_DIR=$PID_DIR  # every worker writes its pid here and removes it at a clean exit
trap 'rm -rf "$PID_DIR"' EXIT

kill_leftovers() {  # workers of a launch that torchrun left behind (it was killed): ours, listed by pid
    local file pid
    for file in "$PID_DIR"/*; do
        [[ -e $file ]] || continue
        pid=${file##*/}
        if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "bench.multi_gpu"; then
            log "   killing worker $pid left over by the launch"
            kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$file"
    done
}

launch() {  # name limit_s steps [extra args...]: one torchrun launch of bench.multi_gpu, cut at its limit
    local name=$1 steps=$3
    step_limit "$name" "$2" 10 || return
    local limit=$LIMIT
    shift 3
    # the script's own soft limit leaves time for torchrun, imports and teardown around its steps
    local soft=$(( limit - 35 ))
    (( soft < 10 )) && soft=10
    local smoke=()
    [[ $MODE == smoke ]] && smoke=(--smoke)
    local extra=()
    read -r -a extra <<< "${MULTI_GPU_ARGS:-}"
    local cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m bench.multi_gpu
               --steps "$steps" --time-limit-s "$soft" --out "$OUT" ${smoke[@]+"${smoke[@]}"} "$@"
               ${extra[@]+"${extra[@]}"})
    log "== $name (limit ${limit}s): ${cmd[*]}"
    local start rc
    start=$(date +%s)
    # SIGTERM: torchrun stops its workers (they unwind; the JSON already holds every finished row); SIGKILL 20 s later
    timeout --signal=TERM --kill-after=20 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    kill_leftovers
    STATUS+=("$name: exit $rc after $(( $(date +%s) - start ))s$( ((rc == 124 || rc == 137)) && echo ' (time limit)')")
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

if [[ $MODE == smoke ]]; then
    launch "smoke: nccl, gate, sp, tp" 300 nccl,gate,sp,tp
else
    # one launch for steps 1 and 2 spares a start-up (~20 s); the nccl JSON is complete before gate search begins
    first=()
    wanted nccl && first+=(nccl)
    wanted gate && first+=(gate)
    if (( ${#first[@]} )); then
        launch "1 nccl + 2 gate search (8B, ZeRO-3, 8K)" 230 "$(IFS=,; echo "${first[*]}")" \
            --gate-lengths 8K --gate-steps 3
    fi
    # 32K: one warm-up and one timed step; 128K: one step, no warm-up (fla does not retune for a new length)
    wanted sp && launch "3 sequence parallel (8B hybrid, 32K, 128K)" 220 sp --sp-compare-length 8K \
        --sp-lengths 32K,128K --warmup 1 --iters 1
    # megatron overlaps its TP all-reduce with the weight-gradient GEMM only with one device connection
    wanted tp && CUDA_DEVICE_MAX_CONNECTIONS=1 launch "4 tensor parallel (1B hybrid, 8K)" 150 tp --tp-length 8K \
        --warmup 1 --iters 3
fi

save_triton_cache
"$PYTHON" -m bench.multi_gpu --summary --out "$OUT" > "$OUT/multi_gpu.md" 2>>"$LOG"
{
    echo
    cat "$OUT/multi_gpu.md"
    echo
    echo "== multi_gpu.sh $MODE: $(( $(date +%s) - STARTED ))s in all"
    printf '   %s\n' "${STATUS[@]}"
} | tee -a "$LOG"
