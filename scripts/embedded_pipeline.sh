#!/usr/bin/env bash
# The embedded default end to end on CPU: gate search -> discretize (gates and every baseline) ->
# export each hybrid -> evaluate each on held-out retrieval -> distill the gate-search hybrid from the
# teacher -> long-context finetune it -> evaluate both -> one comparison table.
#   bash scripts/embedded_pipeline.sh [run_dir]        (default runs/embedded)
# After the gate search: 10 min 48 s wall, 5 min 12 s CPU (measured 2026-12-07 on a 2-core box, shared with other
# jobs, OMP_NUM_THREADS=1); the gate search before it, with its teacher: 16 min 27 s wall, 7 min 44 s CPU.
# Reuses a finished gate search in run_dir; every later step rewrites its own outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/embedded}
RECIPE=recipes/embedded.yaml

if [[ ! -f "$RUN/gates.safetensors" ]]; then
  resume=()
  [[ -d "$RUN/checkpoints" ]] && resume=(--resume)
  python launcher/gate_search.py --config "$RECIPE" --override "run.run_dir=$RUN" "${resume[@]}"
fi

methods=(gates leave_one_out kl nll periodic random)
for method in "${methods[@]}"; do
  echo "== $method"
  select_dir="$RUN/selection/$method"
  if [[ $method == gates ]]; then
    python tools/discretize_gates.py --gates "$RUN/gates.safetensors" --out "$select_dir/hybrid.json" --report --force
  else
    python tools/discretize_gates.py --method "$method" --recipe "$RUN/config.yaml" --model "$RUN/teacher" \
      --out "$select_dir/hybrid.json" --force
  fi
  python tools/export.py --model "$RUN/teacher" --layout "$select_dir/hybrid.json" --recipe "$RUN/config.yaml" \
    --out "$RUN/export/$method" --force
  python tools/evaluate.py --model "$RUN/export/$method" --recipe "$RUN/config.yaml" --tasks mqar \
    --retrieval-lengths 34 --samples 512 --batch-size 64 --no-progress --out "$RUN/eval/$method" > /dev/null
done
python tools/evaluate.py --model "$RUN/teacher" --recipe "$RUN/config.yaml" --tasks mqar \
  --retrieval-lengths 34 --samples 512 --batch-size 64 --no-progress --out "$RUN/eval/teacher" > /dev/null

# stage 4: distill the hybrid gate search chose, then continue it along a length curriculum; a finished stage
# is reused, an interrupted one resumes from its last checkpoint
common=(--override "model.path=$RUN/teacher" --override "student.layout=$RUN/selection/gates/hybrid.json" --no-progress)
run_stage() {  # stage recipe extra-args...
  local stage=$1 recipe=$2; shift 2
  [[ -f "$RUN/$stage/summary.json" ]] && return 0
  local resume=()
  [[ -d "$RUN/$stage/checkpoints" ]] && resume=(--resume)
  python "launcher/$stage.py" --config "$recipe" --override "run.run_dir=$RUN/$stage" "${common[@]}" "$@" "${resume[@]}"
}
run_stage distill recipes/embedded_distill.yaml
run_stage long_context recipes/embedded_long_context.yaml --override "student.init_from=$RUN/distill"
for stage in distill long_context; do
  python tools/evaluate.py --model "$RUN/$stage/student" --recipe "$RUN/config.yaml" --tasks mqar \
    --retrieval-lengths 34 --samples 512 --batch-size 64 --no-progress --out "$RUN/eval/$stage" > /dev/null
done

python - "$RUN" "${methods[@]}" <<'PY'
import json, sys
from pathlib import Path

run, methods = Path(sys.argv[1]), sys.argv[2:]
def layout_of(name):
    return json.loads((run / "selection" / name / "hybrid.json").read_text())["full_layers"]
def recall(name):
    return json.loads((run / "eval" / name / "results.json").read_text())["retrieval"]["overall"]
rows = ["| selection | full-attention layers | selection cost (forward passes, s) | answer-token recall | exact match |",
        "|---|---|---|---|---|"]
teacher = recall("teacher")
rows.append(f"| teacher (all softmax) | all | - | {100 * teacher['token_accuracy']:.1f}% | {100 * teacher['exact_match']:.1f}% |")
for method in methods:
    layout = json.loads((run / "selection" / method / "hybrid.json").read_text())
    cost, score = layout["cost"], recall(method)
    rows.append(f"| {method} | {layout['full_layers']} | {cost['forward_passes']}, {cost['wall_seconds']:.2f} | "
                f"{100 * score['token_accuracy']:.1f}% | {100 * score['exact_match']:.1f}% |")
for stage in ("distill", "long_context"):
    score, info = recall(stage), json.loads((run / stage / "summary.json").read_text())
    kl = info["kl_per_token"]
    rows.append(f"| gates + {stage} (KL {kl['first']:.3f} -> {kl['last']:.3f}) | {layout_of('gates')} | "
                f"{info['steps']} training steps | {100 * score['token_accuracy']:.1f}% | {100 * score['exact_match']:.1f}% |")
summary = json.loads((run / "summary.json").read_text())
rows.append("")
rows.append(f"gates: discretizing reads gates.safetensors; the gate search itself ran {summary.get('steps', '?')} "
            f"forward+backward steps of {summary.get('samples_per_step', '?')} samples (summary.json, tb/).")
table = "\n".join(rows)
(run / "comparison.md").write_text(table + "\n")
print(table)
PY
