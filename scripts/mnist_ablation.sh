#!/usr/bin/env bash
# The paper's MNIST experiment (§4.2: grey levels as tokens, v = 256, class-conditional) as a
# 2D-vs-1D resampling ablation (§3.2, Fig. 5) at equal steps on CPU.
#   bash scripts/mnist_ablation.sh [STEPS] [OUT]
set -euo pipefail
steps=${1:-300}
out=${2:-runs/mnist-ablation}
[ -f data/mnist.npz ] || python scripts/prepare_mnist.py
for resample in 2d 1d; do
  sundae train data/mnist.npz -o "$out/$resample" --preset mnist --dim 64 --heads 2 --head-dim 32 --depth 1,2,1 \
    --resample "$resample" --steps "$steps" --batch-size 8 --lr 1e-3 --warmup-steps 50 --log-every 25 \
    --eval-every 50 --eval-batches 8 --sample-every "$steps" --sample-steps 50 --checkpoint-every 50 --seed 0
done
