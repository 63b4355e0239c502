#!/usr/bin/env bash
# The selection experiment of docs/results.md on one GPU, in calls of < 10 minutes each (the device's limit).
#
#   bash bench/selection_gpu.sh first OUT      # teacher sweep (4 variants side by side), pick the best complete
#                                              # teacher, start the experiment on it; state -> OUT/state.tgz.part*
#   bash bench/selection_gpu.sh continue OUT   # unpack .gpu_state/state.tgz.part* and continue the experiment
#
# PARTS (e.g. search,baselines,evaluate,exhaustive) limits the experiment to some parts.
# Minutes are set by SWEEP_MINUTES (default 4) and EXPERIMENT_MINUTES (default 3.5 in `first`, 8 in `continue`).
# The state (the chosen teacher, stored in bf16 so that it travels in < 64 MiB, and every cached part of the
# experiment without its large files) is split into 15 MiB pieces, the size the device returns per file.
set -uo pipefail
MODE=${1:?usage: bench/selection_gpu.sh first|continue OUT}
OUT=${2:?usage: bench/selection_gpu.sh first|continue OUT}
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

if [[ $MODE == first ]]; then
    "$PYTHON" "$ROOT/bench/teacher_sweep.py" --variants "$ROOT/bench/teacher_sweep.yaml" \
        --only "${SWEEP_VARIANTS:-v_text_warm,v_text_warm_lr3e4,v_h128_text_warm,v_b256}" \
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
    mkdir -p "$STATE"
    # bf16 storage: the experiment then runs on exactly the weights that travel to the next call
    "$PYTHON" - "/tmp/sweep/$BEST" "$TEACHER" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()},
          dst / "model.safetensors", metadata={"format": "pt"})
EOF
    MINUTES=${EXPERIMENT_MINUTES:-3.5}
else
    cat "$ROOT"/.gpu_state/state.tgz.part* | tar -xzf - -C /tmp
    MINUTES=${EXPERIMENT_MINUTES:-8}
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
