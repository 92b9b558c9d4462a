#!/usr/bin/env bash
# Sampling speed on a CUDA GPU (GitHub issue "Speed: megapixel samples far faster than the paper's
# 2 seconds, measured against the hardware limit"). Writes benchmarks/results/<device>-<preset>.json
# (optimised: bf16 autocast, compiled prior replayed as CUDA graphs, bf16 channels-last decoder)
# and <device>-<preset>-eager.json (bf16, no compilation), then checks the issue's targets.
# Usage: benchmarks/run_gpu.sh [repeats]   (about 5-10 minutes on an H100, most of it compilation)
set -euo pipefail
cd "$(dirname "$0")/.."
export REPEATS="${1:-5}"
python - <<'PY'
import os
import sys

sys.path.insert(0, "benchmarks")
from speed import result_filename, run_benchmark, write_json

repeats = int(os.environ["REPEATS"])
runs = [  # preset, batch sizes, knobs, file suffix
    ("ffhq1024", (1, 16), {"compile": True, "cuda_graphs": True}, None),
    ("ffhq256", (1,), {"compile": True, "cuda_graphs": True}, None),
    ("ffhq1024", (1, 16), {}, "eager"),
    ("ffhq256", (1,), {}, "eager"),
]
results = {}
for preset, batch_sizes, knobs, suffix in runs:
    result = run_benchmark(preset=preset, steps=100, batch_sizes=batch_sizes, device="cuda", repeats=repeats,
                           warmup=2, **knobs)
    path = write_json(result, f"benchmarks/results/{result_filename(result, suffix)}")
    results[preset, suffix] = {entry["batch_size"]: entry for entry in result["results"]}
    print(f"{path}: {result['summary']}", flush=True)

ffhq1024, ffhq256 = results["ffhq1024", None], results["ffhq256", None]
targets = [
    ("FFHQ1024 T=100 with decode, batch 1 <= 150 ms/image", ffhq1024[1]["seconds_per_image"] * 1e3, "<=", 150),
    ("FFHQ1024 prior steps, batch 16 >= 40% of bf16 matmul rate", ffhq1024[16]["fraction_of_matmul_peak"] * 100,
     ">=", 40),
    ("FFHQ256 T=100 with decode, batch 1 <= 40 ms/image", ffhq256[1]["seconds_per_image"] * 1e3, "<=", 40),
    ("FFHQ1024 batch 1 peak reserved GPU memory <= 6 GiB",
     max(ffhq1024[1]["prior_peak_memory_reserved_bytes"], ffhq1024[1]["decode_peak_memory_reserved_bytes"]) / 2**30,
     "<=", 6),
]
for name, value, relation, limit in targets:
    met = value <= limit if relation == "<=" else value >= limit
    print(f"{'PASS' if met else 'FAIL'}  {name}: {value:.3g}")
PY
