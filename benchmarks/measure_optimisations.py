"""Each sampling optimisation measured on its own, against its own baseline, on this machine
(GitHub issue "Speed": "Each optimisation is measured on its own").

One knob changes at a time; everything else stays at the baseline (eager, fp32 on CPU / bf16 on
CUDA, batch 1, random weights; the trained shipped model for self-stopping, which needs a model
that converges):

* attention: ``scaled_dot_product_attention``'s fused kernels vs its plain math backend (forward);
* compiled step: eager vs the whole step compiled (on CUDA replayed as a CUDA graph);
* precision: fp32 vs bf16 (prior under autocast, decoder with bf16 weights);
* decoder memory layout: contiguous vs channels-last (bf16 decoder);
* tiled decoding: 1, 2 and 4 tiles per side (time and peak memory);
* memory: peak live-tensor bytes of one bf16 sampling step at batch 1 (what a GPU would allocate);
* self-stopping + batch shrinking: the shipped model, T steps, N samples, early stop off / on with
  compaction every step / every 10 steps.

Usage::

    python benchmarks/measure_optimisations.py                    # ffhq1024, CUDA when available
    python benchmarks/measure_optimisations.py --preset ffhq256 --steps 10 --repeats 1 --device cpu

Writes ``benchmarks/results/<device>-<preset>-optimisations.json`` and prints one line per row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sundae.config import HOURGLASS_PRESETS, VQGAN_PRESETS, preset
from sundae.pipeline import SundaePipeline
from sundae.runtime import autocast, resolve_device, resolve_precision
from sundae.sampler import SamplingOptions, sample
from sundae.speed import PRESET_TOKENIZERS, build_prior, build_tokenizer, median_seconds, time_call
from sundae.tokenizer import decode_in_tiles
from speed import (  # benchmarks/speed.py, beside this script
    device_facts, load_average, peak_tensor_bytes, result_filename, run_benchmark, track_peak_memory, write_json,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "src" / "sundae" / "assets" / "default"


def attention_kernels(prior_preset: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    prior = build_prior(preset(prior_preset, HOURGLASS_PRESETS), device, dtype)
    config = prior.config
    tokens = torch.randint(0, config.codebook_size, (1, *config.latent_shape), device=device)
    labels = None if config.num_classes is None else torch.zeros(1, dtype=torch.long, device=device)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            prior(tokens, labels)

    forward()
    fused = median_seconds(forward, device, repeats=repeats)
    with sdpa_kernel(SDPBackend.MATH):
        forward()
        math_backend = median_seconds(forward, device, repeats=repeats)
    return {"forward_seconds_fused_sdpa": fused, "forward_seconds_math_sdpa": math_backend,
            "speedup": math_backend / fused}


def prior_knob(prior_preset: str, *, steps: int, repeats: int, device: torch.device, **knobs: Any) -> dict[str, Any]:
    result = run_benchmark(preset=prior_preset, steps=steps, batch_sizes=(1,), device=device, repeats=repeats,
                           warmup=1, decode=False, **knobs)
    entry = result["results"][0]
    return {key: entry[key] for key in ("step_seconds", "forward_seconds", "fraction_of_matmul_peak",
                                        "matmul_flops_per_second", "operators_per_step", "prior_peak_memory_bytes")}


def decode_knob(prior_preset: str, *, device: torch.device, dtype: torch.dtype, channels_last: bool,
                tiles: int | None, repeats: int) -> dict[str, Any]:
    prior_config = preset(prior_preset, HOURGLASS_PRESETS)
    config = preset(PRESET_TOKENIZERS[prior_preset], VQGAN_PRESETS).replace(codebook_size=prior_config.codebook_size)
    tokenizer = build_tokenizer(config, device, dtype=dtype, channels_last=channels_last)
    tokens = torch.randint(0, config.codebook_size, (1, *prior_config.latent_shape), device=device)

    def decode() -> None:
        with torch.inference_mode():
            decode_in_tiles(tokenizer, tokens, tiles=tiles)

    decode()  # warm-up: kernels, allocator
    with track_peak_memory(device) as memory:
        seconds = median_seconds(decode, device, repeats=repeats)
    tensors = peak_tensor_bytes(decode, device)
    return {"decode_seconds": seconds, "peak_tensor_bytes": tensors, "peak_memory_bytes": memory.peak_bytes,
            "memory_increase_bytes": memory.increase_bytes, "peak_memory_reserved_bytes": memory.reserved_bytes}


def step_memory(prior_preset: str, *, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Peak live-tensor bytes of one sampling step at batch 1 (weights included): the prior's share
    of accelerator memory, measurable on any device (:func:`speed.peak_tensor_bytes`)."""
    prior = build_prior(preset(prior_preset, HOURGLASS_PRESETS), device, dtype)
    config = prior.config
    labels = None if config.num_classes is None else torch.zeros(1, dtype=torch.long, device=device)

    def one_step() -> None:
        with autocast(device, dtype):
            sample(prior, options=SamplingOptions(steps=1), num_samples=1, grid_shape=tuple(config.latent_shape),
                   class_labels=labels, seeds=[0])

    one_step()
    weights = sum(tensor.numel() * tensor.element_size() for tensor in prior.state_dict().values())
    return {"dtype": str(dtype).removeprefix("torch."), "weights_bytes": weights,
            "step_peak_tensor_bytes": peak_tensor_bytes(one_step, device)}


def self_stopping(model_dir: Path, *, device: torch.device, steps: int, num_samples: int) -> list[dict[str, Any]]:
    pipe = SundaePipeline.from_pretrained(model_dir, device=device)
    num_classes = pipe.prior.config.num_classes
    labels = None if num_classes is None else torch.arange(num_samples) % num_classes
    rows = []
    for name, early_stop, interval in (("no early stop", False, 1), ("early stop, compaction every step", True, 1),
                                       ("early stop, compaction every 10 steps", True, 10)):
        options = SamplingOptions(steps=steps, early_stop=early_stop, compaction_interval=interval)

        def run() -> Any:
            with autocast(device, pipe.dtype):
                return sample(pipe.prior, options=options, num_samples=num_samples,
                              grid_shape=tuple(pipe.prior.config.latent_shape), class_labels=labels,
                              seeds=torch.arange(num_samples))

        run()
        output, seconds = time_call(run, device)
        rows.append({"setting": name, "seconds": seconds, "mean_steps_taken": output.steps_taken.float().mean().item(),
                     "forward_rows": sum(output.forward_rows), "full_rows": steps * num_samples})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ffhq1024", choices=sorted(PRESET_TOKENIZERS))
    parser.add_argument("--steps", type=int, default=20, help="Prior steps per timed run (times are per step).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Trained model for the self-stopping rows.")
    parser.add_argument("--stop-steps", type=int, default=100)
    parser.add_argument("--stop-samples", type=int, default=64)
    parser.add_argument("--skip", default="", help="Comma-separated sections to skip: attention,compile,precision,"
                                                   "layout,tiles,memory,stopping.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    low = resolve_precision("bfloat16", device)
    base = resolve_precision("auto", device)
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "repeats": args.repeats,
                              "device": device_facts(device), "torch_version": torch.__version__,
                              "load_average_before": load_average()}

    def section(name: str, compute) -> None:  # noqa: ANN001 - a zero-argument callable
        if name in skip:
            return
        started = time.perf_counter()
        report[name] = compute()
        print(f"{name} ({time.perf_counter() - started:.0f} s): {report[name]}", flush=True)

    base_name = str(base).removeprefix("torch.")
    knobs = {"steps": args.steps, "repeats": args.repeats, "device": device}
    section("attention", lambda: attention_kernels(args.preset, device, base, args.repeats))
    section("compile", lambda: {
        "eager": prior_knob(args.preset, dtype=base_name, **knobs),
        "compiled": prior_knob(args.preset, dtype=base_name, compile=True, cuda_graphs=device.type == "cuda", **knobs)})
    section("precision", lambda: {
        "float32": {**prior_knob(args.preset, dtype="float32", **knobs),
                    **decode_knob(args.preset, device=device, dtype=torch.float32, channels_last=False, tiles=None,
                                  repeats=args.repeats)},
        "bfloat16": {**prior_knob(args.preset, dtype="bfloat16", **knobs),
                     **decode_knob(args.preset, device=device, dtype=low, channels_last=False, tiles=None,
                                   repeats=args.repeats)}})
    section("layout", lambda: {
        layout: decode_knob(args.preset, device=device, dtype=low, channels_last=layout == "channels_last", tiles=None,
                            repeats=args.repeats) for layout in ("contiguous", "channels_last")})
    section("tiles", lambda: {
        str(tiles): decode_knob(args.preset, device=device, dtype=base, channels_last=device.type == "cuda",
                                tiles=tiles, repeats=args.repeats) for tiles in (1, 2, 4)})
    section("memory", lambda: {"prior_step": step_memory(args.preset, device=device, dtype=low),
                                "note": "bf16 as on CUDA; decoder peaks (bf16 with CUDA's layout) are in 'tiles' "
                                        "on CUDA and in 'precision'/'layout' elsewhere"})
    section("stopping", lambda: self_stopping(args.model, device=device, steps=args.stop_steps,
                                              num_samples=args.stop_samples))
    report["load_average_after"] = load_average()
    facts = {"device": report["device"], "preset": args.preset}
    path = write_json(report, Path("benchmarks/results") / result_filename(facts, "optimisations"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
