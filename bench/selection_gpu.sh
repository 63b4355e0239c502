#!/usr/bin/env bash
# The selection experiment of docs/gate_search.md on one GPU, in calls of < 10 minutes each (the device's limit).
#
#   bash bench/selection_gpu.sh first OUT      # train the proxy teacher (recipes/experiments/proxy_teacher.yaml)
#                                              # and start the experiment on it; state -> OUT/state.tgz.part*
#   bash bench/selection_gpu.sh continue OUT   # unpack .gpu_state/state.tgz.part* and continue the experiment
#   bash bench/selection_gpu.sh sweep OUT      # teacher recipe search instead (bench/teacher_sweep.yaml variants
#                                              # side by side; SWEEP_VARIANTS, SWEEP_MINUTES); picks the best complete
#                                              # teacher and starts the experiment on it
#
# PARTS (e.g. search,baselines,evaluate,exhaustive) limits the experiment to some parts. Minutes: TEACHER_MINUTES
# (default 5), SWEEP_MINUTES (default 4), EXPERIMENT_MINUTES (default 3.5 after a teacher, 8 in `continue`).
# The state (the teacher, stored in bf16 so that it travels in < 64 MiB, and every cached part of the experiment
# without its large files) is split into 15 MiB pieces, the size the device returns per file.
set -uo pipefail
MODE=${1:?usage: bench/selection_gpu.sh first|continue|sweep OUT}
OUT=${2:?usage: bench/selection_gpu.sh first|continue|sweep OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG=$OUT/selection_gpu.log
mkdir -p "$OUT"
source "$ROOT/bench/gpu_env.sh"
prepare_node
STATE=/tmp/selection_state
EXP=$STATE/selection
TEACHER=$STATE/teacher
nvidia-smi -L | tee -a "$LOG"
log "== $(date -u +%FT%TZ) commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none) mode $MODE"

to_bf16() {  # the experiment then runs on exactly the weights that travel to the next call
    mkdir -p "$STATE"
    "$PYTHON" - "$1" "$TEACHER" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()},
          dst / "model.safetensors", metadata={"format": "pt"})
EOF
}

if [[ $MODE == first ]]; then
    "$PYTHON" "$ROOT/launcher/teacher.py" --config "$ROOT/recipes/experiments/proxy_teacher.yaml" --no-progress \
        --override out_dir=/tmp/proxy_teacher --max-minutes "${TEACHER_MINUTES:-5}" 2>&1 | tee -a "$LOG"
    CODE=${PIPESTATUS[0]}
    cp /tmp/proxy_teacher/teacher_report.json "$OUT/" 2>/dev/null
    if [[ $CODE != 0 ]]; then log "== teacher exit code $CODE: no experiment on it"; exit "$CODE"; fi
    to_bf16 /tmp/proxy_teacher
    MINUTES=${EXPERIMENT_MINUTES:-3.5}
elif [[ $MODE == sweep ]]; then
    "$PYTHON" -m bench.teacher_sweep --variants "$ROOT/bench/teacher_sweep.yaml" \
        --only "${SWEEP_VARIANTS:-v_b256,v_b256_text32,v_b256_text64}" \
        --minutes "${SWEEP_MINUTES:-4}" --out "$OUT/teacher_sweep.json" --work /tmp/sweep 2>&1 | tee -a "$LOG"
    for f in /tmp/sweep/*.log; do echo "== $f"; grep -E "stage|teacher:|step [0-9]*000/" "$f"; done > "$OUT/sweep_logs.txt"
    # the best teacher: finished with every curriculum stage advanced, highest held-out recall
    BEST=$("$PYTHON" - "$OUT/teacher_sweep.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
done = {n: r for n, r in results.items() if r["finished"] and r["curriculum_complete"]}
print(max(done, key=lambda n: done[n]["recall_accuracy"]) if done else "")
EOF
)
    if [[ -z $BEST ]]; then log "no sweep variant finished its curriculum: see $OUT/teacher_sweep.json"; exit 3; fi
    log "== best teacher: $BEST"
    to_bf16 "/tmp/sweep/$BEST"
    MINUTES=${EXPERIMENT_MINUTES:-3.5}
elif [[ $MODE == continue ]]; then
    cat "$ROOT"/.gpu_state/state.tgz.part* | tar -xzf - -C /tmp
    MINUTES=${EXPERIMENT_MINUTES:-8}
else
    log "error: mode $MODE is not first, continue or sweep"; exit 2
fi

"$PYTHON" -m flashmorph.experiments.selection --config "$ROOT/recipes/experiments/selection.yaml" \
    --override "teacher_dir=$TEACHER" --out "$EXP" --max-minutes "$MINUTES" ${PARTS:+--only "$PARTS"} 2>&1 | tee -a "$LOG"
CODE=${PIPESTATUS[0]}
log "== experiment exit code $CODE"
cp "$EXP/results.json" "$EXP/report.md" "$OUT/" 2>/dev/null
# everything the next call needs, without the large files (exported students, checkpoints)
(cd /tmp && find selection_state -type f -size -2M -o -path '*/teacher/*' -type f) | grep -v '/checkpoints/' \
    | tar -czf - -C /tmp -T - | split -b 15M - "$OUT/state.tgz.part"
ls -la "$OUT" | tee -a "$LOG"
exit "$CODE"
