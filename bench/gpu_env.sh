# Sourced by bench/run_gpu.sh, bench/multi_gpu.sh and bench/selection_gpu.sh (they set ROOT and LOG first): the
# environment every GPU benchmark runs in (PYTHONPATH holds the checkout, so `python -m bench.<name>` runs from any
# directory), `log`; `prepare_node`, which restores fla's Triton autotuning cache and, where fla does not import,
# installs wheelhouse/ into /tmp/flashmorph-site offline; `step_limit` and `save_triton_cache` for the step runners.
export PYTHON=${PYTHON:-python3}  # install_wheelhouse.sh uses the same interpreter
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # 128K: less fragmentation
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.bench_cache/triton}

log() { echo "$*" | tee -a "$LOG"; }

prepare_node() {
    if [[ -f $ROOT/.bench_cache/triton_cache.tgz && ! -d $TRITON_CACHE_DIR ]]; then
        mkdir -p "$TRITON_CACHE_DIR" && tar -xzf "$ROOT/.bench_cache/triton_cache.tgz" -C "$TRITON_CACHE_DIR"
        log "== restored the Triton cache from .bench_cache/triton_cache.tgz"
    fi
    if [[ -d /tmp/flashmorph-site/fla ]]; then  # installed by an earlier call on this (still warm) machine
        export PYTHONPATH=/tmp/flashmorph-site:$PYTHONPATH
    fi
    if ! "$PYTHON" -c "import fla" >/dev/null 2>&1; then
        if [[ ! -f $ROOT/wheelhouse/requirements.txt ]]; then
            log "error: fla does not import and there is no wheelhouse/; build one with scripts/build_wheelhouse.sh"
            exit 1
        fi
        log "== installing wheelhouse/ into /tmp/flashmorph-site"
        bash "$ROOT/scripts/install_wheelhouse.sh" --target /tmp/flashmorph-site 2>&1 | tee -a "$LOG"
        export PYTHONPATH=/tmp/flashmorph-site:$PYTHONPATH
        "$PYTHON" -c "import fla, flashmorph" || { log "error: fla still does not import"; exit 1; }
    fi
}

step_limit() {  # name limit_s margin_s: sets LIMIT to what the step may run before DEADLINE less margin_s, or
    local name=$1 margin=$3  # records a skip and returns 1 when under 45 s would be left
    local left=$(( DEADLINE - $(date +%s) - margin ))
    if (( left < 45 )); then
        log "== $name: skipped, ${left}s left before the deadline"
        STATUS+=("$name: skipped (deadline)")
        return 1
    fi
    LIMIT=$2
    (( LIMIT > left )) && LIMIT=$left
    return 0
}

save_triton_cache() {  # with BENCH_SAVE_TRITON_CACHE=1: $OUT/triton_cache.tgz for a later fresh machine (<= 15 MiB)
    if [[ ${BENCH_SAVE_TRITON_CACHE:-0} == 1 && -d $TRITON_CACHE_DIR ]]; then
        tar -czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
        if (( $(stat -c %s "$OUT/triton_cache.tgz") > 15 * 1024 * 1024 )); then
            rm -f "$OUT/triton_cache.tgz"
            log "== the Triton cache is over 15 MiB packed; not saved"
        fi
    fi
}
