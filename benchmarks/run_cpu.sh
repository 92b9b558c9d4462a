#!/usr/bin/env bash
# Sampling speed on this machine's CPU, all its threads, fp32: benchmarks/results/cpu-<preset>[-SUFFIX].json.
# T=100 at batch 1 takes minutes per run, hence one timed run after a short warm-up by default;
# the per-step time and its fraction of the matmul rate are what count.
#
# TRAIN=1 writes the training-step table instead (cpu-<name>-train-<step>-<dtype>[-ddp2][-SUFFIX].json):
# the prior step of ffhq256 and ffhq1024 (batch 1) and of the shipped recipes' priors at their recipe
# batch sizes (fashion-mnist 128, emoji 32), in float32 and bfloat16; the recipes' tokenizer steps (fashion-mnist
# batch 64 without perceptual term, emoji batch 16 with ST-LPIPS); and 2-process DDP of the ffhq256 prior step.
#
# OpenMP threads wait passively by default here: on a machine shared with other jobs, libgomp's
# default spin-waiting lets one descheduled thread stall every parallel op at its barrier, which
# made the 2-thread prior step 2-5x slower than with OMP_WAIT_POLICY=PASSIVE (see README).
# Usage: [STEPS=100] [REPEATS=1] [SUFFIX=...] [OMP_WAIT_POLICY=...] benchmarks/run_cpu.sh [preset ...]
#        (default presets: ffhq256 ffhq1024)
#        TRAIN=1 [REPEATS=3] [PRECISIONS="float32 bfloat16"] [SUFFIX=...] benchmarks/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" STEPS="${STEPS:-100}" SUFFIX="${SUFFIX:-}"
if [ -n "${TRAIN:-}" ]; then
    REPEATS="${REPEATS:-3}"
    speed() { python benchmarks/speed.py --train "$@" --device cpu --repeats "$REPEATS" ${SUFFIX:+--suffix "$SUFFIX"}; }
    for precision in ${PRECISIONS:-float32 bfloat16}; do
        speed --preset ffhq256 --batch-sizes 1 --precision "$precision"
        speed --preset ffhq1024 --batch-sizes 1 --precision "$precision"
        speed --model fashion-mnist --batch-sizes 128 --precision "$precision"
        speed --model emoji --batch-sizes 32 --precision "$precision"
        speed tokenizer --model fashion-mnist --batch-sizes 64 --perceptual none --precision "$precision"
        speed tokenizer --model emoji --batch-sizes 16 --perceptual stlpips-vgg --precision "$precision"
    done
    python benchmarks/speed.py --train --ddp 2 --preset ffhq256 --batch-sizes 1 --precision float32 \
        --repeats "$REPEATS" ${SUFFIX:+--suffix "$SUFFIX"}
    exit 0
fi
REPEATS="${REPEATS:-1}"
presets=("$@")
if [ ${#presets[@]} -eq 0 ]; then presets=(ffhq256 ffhq1024); fi
for preset in "${presets[@]}"; do
    python benchmarks/speed.py --preset "$preset" --steps "$STEPS" --batch-sizes 1 --device cpu --repeats "$REPEATS" \
        --warmup 1 ${SUFFIX:+--suffix "$SUFFIX"}
done
