#!/usr/bin/env bash
# Sampling speed on this machine's CPU, all its threads, fp32: benchmarks/results/cpu-<preset>[-SUFFIX].json.
# T=100 at batch 1 takes minutes per run, hence one timed run after a short warm-up by default;
# the per-step time and its fraction of the matmul rate are what count.
#
# OpenMP threads wait passively by default here: on a machine shared with other jobs, libgomp's
# default spin-waiting lets one descheduled thread stall every parallel op at its barrier, which
# made the 2-thread prior step 2-5x slower than with OMP_WAIT_POLICY=PASSIVE (see README).
# Usage: [STEPS=100] [REPEATS=1] [SUFFIX=...] [OMP_WAIT_POLICY=...] benchmarks/run_cpu.sh [preset ...]
#        (default presets: ffhq256 ffhq1024)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" STEPS="${STEPS:-100}" REPEATS="${REPEATS:-1}" SUFFIX="${SUFFIX:-}"
presets=("$@")
if [ ${#presets[@]} -eq 0 ]; then presets=(ffhq256 ffhq1024); fi
for preset in "${presets[@]}"; do
    python benchmarks/speed.py --preset "$preset" --steps "$STEPS" --batch-sizes 1 --device cpu --repeats "$REPEATS" \
        --warmup 1 ${SUFFIX:+--suffix "$SUFFIX"}
done
