#!/usr/bin/env bash
# 2D-vs-1D resampling ablation (paper §3.2, Fig. 5) on the default model's Fashion-MNIST latents
# (7x7 tokens, v = 1024): two priors of the same size trained with the same data order, seed and
# number of steps (equal budget), then scored with `sundae evaluate` (classifier features, held-out
# split, class-balanced samples, the model's default sampling). Writes RUN/ablation.json.
#   bash scripts/ablation_resampling.sh [STEPS] [LATENTS] [RUN]
# Other data (the emoji model's 16x16 grid): PRESET=emoji BATCH=32 REAL=data/emoji/validation
#   CLASSIFIER=src/sundae/assets/emoji-classifier bash scripts/ablation_resampling.sh 500 runs/emoji/latents runs/emoji/ablation
set -euo pipefail
steps=${1:-800}
latents=${2:-runs/default/latents}
run=${3:-runs/ablation}
samples=${SAMPLES:-1000}
preset=${PRESET:-fashion-mnist}
batch=${BATCH:-64}
real=${REAL:-data/fashion-mnist/validation}
classifier=()
[[ -n ${CLASSIFIER:-} ]] && classifier=(--extractor-path "$CLASSIFIER")
export OMP_WAIT_POLICY=PASSIVE
for resample in 2d 1d; do
  started=$SECONDS
  sundae train "$latents" -o "$run/$resample" --preset "$preset" --dim 128 --heads 2 --head-dim 64 --depth 2,4,2 \
    --resample "$resample" --steps "$steps" --batch-size "$batch" --lr 1e-3 --warmup-steps 100 --ema-decay 0.999 \
    --log-every 50 --eval-every "$steps" --eval-batches 16 --sample-every "$steps" --checkpoint-every "$steps" --seed 0
  echo "$resample train $((SECONDS - started)) s" >> "$run/timings.txt"
  sundae evaluate --model "$run/$resample/model" --real "$real" "${classifier[@]}" --num-samples "$samples" \
    --batch-size 250 --out "$run/$resample/evaluation.json"
done
python - "$run" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = {}
for resample in ("2d", "1d"):
    metrics = [json.loads(line) for line in (run / resample / "metrics.jsonl").read_text().splitlines()]
    ema = [row for row in metrics if "validation_ema/loss" in row][-1]
    raw = [row for row in metrics if "validation/loss" in row][-1]
    report = json.loads((run / resample / "evaluation.json").read_text())
    rows[resample] = {"step": ema["step"], "validation_loss_raw": raw["validation/loss"],
                      "validation_loss_ema": ema["validation_ema/loss"], **report["metrics"],
                      "num_samples": report["num_fake"]}
    rows[resample].pop("fid_infinity_points", None)
(run / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows, indent=2))
EOF
