# Sourced by bench/run_gpu.sh and bench/multi_gpu.sh (both set ROOT and LOG first): the environment every GPU
# benchmark runs in, `log`, and `prepare_node`, which restores fla's Triton autotuning cache and, where fla does not
# import, installs wheelhouse/ into /tmp/flashmorph-site offline.
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
