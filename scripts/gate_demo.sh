#!/usr/bin/env bash
# The gate on a CPU, start to end (docs/gate.md shows one run's numbers):
#   1. a champion is trained on the smoke data and published to a local target;
#   2. new data arrives (another seed: other images, so another fingerprint) and a challenger
#      trained for a few steps clears the threshold but is refused: the champion is evaluated
#      again on the new test images and the reason names both numbers there;
#   3. a challenger trained longer on the same new data beats it and is published.
# Usage: scripts/gate_demo.sh [OUT]   (default runs/gate-demo; ~10 minutes on 2 free cores;
#        on a shared machine OMP_NUM_THREADS=1 avoids thread thrashing)
set -euo pipefail
OUT=$(realpath -m "${1:-runs/gate-demo}")
TARGET="local:$OUT/published"
VLMDET=${VLMDET:-vlmdet}
COMMON=(--preset smoke --publish.target "$TARGET" --train.save_steps 1000 --eval.eval_base false)

show() {  # the gate's numbers from a run's summary.json
  python - "$1/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
g = s["gate"]
print(f"  fingerprint {s['dataset']['fingerprint'][:12]}, {g['images'] or s['evaluation']['images']} test images, "
      f"{s['training']['global_step']} steps")
print(f"  new {g['metric']} {g['value']:.4f}; champion on these images: {g['champion'] if g['champion'] is None else round(g['champion'], 4)}"
      f" (its card: {g['champion_recorded']}); P(better) {g['p_better']}; CI {g['ci']}")
print(f"  passed={g['passed']} published={bool(s['published'])}")
print(f"  reason: {g['reason']}")
EOF
}

STAGES=${STAGES:-1 2 3}  # e.g. STAGES="2 3" to run the challengers again against the published champion

if [[ " $STAGES " == *" 1 "* ]]; then
  echo "== 1. champion (smoke data, seed 0, 60 steps)"
  $VLMDET retrain "${COMMON[@]}" --workdir "$OUT/1-champion" --train.max_steps 60
  show "$OUT/1-champion"
fi
if [[ " $STAGES " == *" 2 "* ]]; then
  echo "== 2. new data (seed 1), challenger trained 20 steps: must be refused"
  $VLMDET retrain "${COMMON[@]}" --workdir "$OUT/2-short" --data.seed 1 --train.max_steps 20
  show "$OUT/2-short"
fi
if [[ " $STAGES " == *" 3 "* ]]; then
  echo "== 3. the same new data, challenger trained 300 steps: must be published"
  $VLMDET retrain "${COMMON[@]}" --workdir "$OUT/3-long" --data.seed 1 --train.max_steps 300
  show "$OUT/3-long"
fi
