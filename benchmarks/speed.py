"""The speed harness: sampling and training speed measured against the hardware limit (paper §1,
§4.1 and Fig. 1: a 1024² FFHQ sample, T = 100 prior steps plus VQ-GAN decoding, in about 2 s on a
GTX 1080Ti). Not part of the installed package: run from a source checkout.

:func:`run_benchmark` samples with the random-weight models of :mod:`sundae.speed` (what
``sundae bench`` times) and reports wall-clock times next to the work done: the FLOPs of one
prior step and of one decode, counted on the real modules
(:func:`sundae.training.throughput.count_flops`), and the device's peak dense matmul rate in the
same dtype, measured in the same run before the first and after every timed run as the best over
a few shapes around the prior's own ``(batch·tokens, dim) @ (dim, 4·dim)``
(:func:`sundae.speed.peak_matmul_rate`). The ratio says how far the prior step (network forward
*and* the sampling arithmetic over the ``v`` logits) is from the hardware limit. The network's
share of a step is timed inside the same runs (:class:`sundae.speed.ForwardTimer`), so every
derived time lies between 0 and the step's. Times come from the median and the fastest run.

``--train`` times optimizer steps instead (:mod:`sundae.training.benchmark`, also ``sundae bench
--train``), and ``--train --ddp 2`` their scaling over two CPU processes on gloo.

Timing: on CUDA the device is synchronised (and CUDA events recorded) only at the boundaries of
a measured region, never inside the sampling loop; on CPU ``time.perf_counter`` is used. Peak
memory: :func:`sundae.speed.track_peak_memory` (CUDA ``max_memory_allocated``; CPU peak resident
set size).

Usage: ``from speed import run_benchmark`` with ``benchmarks/`` on ``sys.path`` (the scripts
beside this file), or ``python benchmarks/speed.py --preset tiny --steps 2`` (one JSON file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from sundae.denoiser import count_parameters
from sundae.runtime import autocast
from sundae.speed import (
    PRESET_TOKENIZERS, WARMUP_STEPS, BenchmarkError, BenchmarkModels, ForwardTimer, benchmark_models,
    benchmark_sampling_options, class_labels_for, decoding_run, device_facts, format_seconds, load_average,
    matmul_shapes, minimum_and_median, peak_matmul_rate, sampling_run, setting_line, time_call, track_peak_memory,
)
from sundae.tokenizer import VQGAN
from sundae.training.benchmark import TRAINING_STEPS, ddp_scaling, time_prior_training, time_tokenizer_training
from sundae.training.throughput import count_flops

RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger(__name__)


# --- measuring ---------------------------------------------------------------------------------


def peak_tensor_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of live tensors while ``function`` runs (weights and inputs it touches included).

    The same quantity as CUDA's ``max_memory_allocated``, but measured on any device through the
    profiler's memory timeline: on a CPU it tells how much accelerator memory the same work needs
    (without the CUDA context, library workspaces and allocator rounding). Uses torch's private
    ``torch.profiler._memory_profiler``; a torch without it raises a clear error.
    """
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError as error:  # pragma: no cover - depends on the torch version
        raise BenchmarkError(f"this torch has no profiler memory timeline ({error}); use torch >= 2.1") from None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                with_stack=True) as profiler:
        function()
    if device.type == "cuda" and device.index is None:  # the timeline names devices with their index
        device = torch.device("cuda", torch.cuda.current_device())
    _, sizes = MemoryProfileTimeline(profiler._memory_profile())._coalesce_timeline(str(device))
    return max((sum(categories) for categories in sizes), default=0)


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators that run (views excluded): in eager mode, one kernel launch each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(function: Callable[[], Any]) -> int:
    with OperatorCounter() as counter:
        function()
    return counter.count


# --- the benchmark ---------------------------------------------------------------------------


def _sampling_run_figures(output: Any, seconds: float, forward_seconds: float | None, *, flops_per_step: int,
                          batch: int, memory: Any) -> dict[str, Any]:
    """The figures of one timed sampling run. ``forward_seconds`` (all its forwards, None when compiled)
    is measured inside the same run, so the sampling arithmetic ``seconds - forward_seconds`` lies in
    ``[0, seconds]`` by construction."""
    iterations = len(output.forward_rows)
    # FLOPs are linear in the batch: samples removed by compaction cost nothing
    flops = flops_per_step / batch * sum(output.forward_rows)
    eager = forward_seconds is not None
    return {"seconds": seconds, "iterations": iterations, "output": output, "memory": memory,
            "step_seconds": seconds / iterations, "flops_per_second": flops / seconds,
            "forward_seconds": forward_seconds / iterations if eager else None,
            "sampling_seconds_per_step": (seconds - forward_seconds) / iterations if eager else None,
            "forward_flops_per_second": flops / forward_seconds if eager else None}


def benchmark_batch(models: BenchmarkModels, *, batch: int, steps: int, early_stop: bool, repeats: int, warmup: int,
                    decode_tiles: int | None) -> dict[str, Any]:
    """Every measurement at one batch size; see :func:`run_benchmark`.

    Each timed run also times its network forwards (:class:`sundae.speed.ForwardTimer`), so the
    forward and the sampling arithmetic of a step are the parts of that run's own time. A compiled
    step runs both inside one graph, where no hook fires: the split is reported for eager runs only.
    """
    prior, device, dtype = models.prior, models.device, models.dtype
    config = prior.config
    log.info("bench: batch %d, %d steps, %d warm-up + %d timed runs ...", batch, steps, warmup, repeats)
    eager = models.compile_mode is None
    grid = tuple(config.latent_shape)
    labels = class_labels_for(config, batch, device)
    with torch.inference_mode():
        tokens = torch.randint(0, config.codebook_size, (batch, *grid), device=device,
                               generator=torch.Generator(device=device).manual_seed(0))
    options = benchmark_sampling_options(steps=steps, early_stop=early_stop)
    run_sampler = sampling_run(models, batch=batch)

    def forward() -> Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return prior(tokens, labels)

    flops_per_step = count_flops(forward)
    # eager ATen operators (kernel launches) per step: a two-step run minus a one-step run
    one, two = (benchmark_sampling_options(steps=count, early_stop=False) for count in (1, 2))
    operators_per_step = (count_operators(lambda: run_sampler(two, None))
                          - count_operators(lambda: run_sampler(one, None)))
    forward_operators = count_operators(forward)
    shapes = matmul_shapes(batch * math.prod(grid), config.dim)
    warmup_options = benchmark_sampling_options(steps=min(steps, WARMUP_STEPS), early_stop=early_stop)
    for _ in range(warmup):
        run_sampler(warmup_options)
    # a shared machine's speed drifts: the peak is the best rate measured before the first run and
    # after every run, at several shapes
    rates = [peak_matmul_rate(shapes, dtype=dtype, device=device)]
    runs = []
    for _ in range(repeats):
        forwards = ForwardTimer(prior, device) if eager else None
        with track_peak_memory(device) as memory, forwards or contextlib.nullcontext():
            output, seconds = time_call(lambda: run_sampler(options), device)
        runs.append(_sampling_run_figures(output, seconds, forwards.seconds if eager else None,
                                          flops_per_step=flops_per_step, batch=batch, memory=memory))
        rates.append(peak_matmul_rate(shapes, dtype=dtype, device=device))
    by_time = sorted(runs, key=lambda run: run["seconds"])
    median, fastest = by_time[(len(runs) - 1) // 2], by_time[0]  # the lower middle run for an even count
    peak = max(rates)
    memory = max((run["memory"] for run in runs), key=lambda found: found.peak_bytes or 0)

    result: dict[str, Any] = {
        "batch_size": batch,
        **_median_and_min(median, fastest, ("step_seconds", "forward_seconds", "sampling_seconds_per_step")),
        "prior_seconds": median["seconds"],
        "prior_seconds_min": fastest["seconds"],
        "prior_seconds_all_repeats": [run["seconds"] for run in runs],
        "iterations": median["iterations"],
        "mean_steps_taken": median["output"].steps_taken.float().mean().item(),
        "flops_per_step": flops_per_step,
        "operators_per_step": operators_per_step,
        "forward_operators": forward_operators,
        "sampling_operators_per_step": operators_per_step - forward_operators,
        "flops_per_sample_step": flops_per_step / batch,
        "achieved_flops_per_second": median["flops_per_second"],
        "forward_flops_per_second": median["forward_flops_per_second"],
        "matmul_flops_per_second": peak,
        "matmul_flops_per_second_all_measurements": rates,
        "matmul_shapes": [[rows, dim, 4 * dim] for rows, dim in shapes],
        "fraction_of_matmul_peak": median["flops_per_second"] / peak,
        "fraction_of_matmul_peak_best": fastest["flops_per_second"] / peak,
        "forward_fraction_of_matmul_peak": median["forward_flops_per_second"] / peak if eager else None,
        "prior_peak_memory_bytes": memory.peak_bytes,
        "prior_memory_increase_bytes": memory.increase_bytes,
        "prior_peak_memory_reserved_bytes": memory.reserved_bytes,
        "memory_method": memory.method,
    }
    result.update(_benchmark_decode(models.tokenizer, median["output"].tokens, device=device, repeats=repeats,
                                    warmup=warmup, tiles=decode_tiles))
    end_to_end = median["seconds"] + (result["decode_seconds"] or 0.0)
    result["seconds_per_image"] = end_to_end / batch
    result["images_per_second"] = batch / end_to_end
    peaks = [value for value in (memory.peak_bytes, result["decode_peak_memory_bytes"]) if value is not None]
    result["peak_memory_bytes"] = max(peaks, default=None)
    return result


def _median_and_min(median: dict[str, Any], fastest: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``key`` from the median run and ``key_min`` from the fastest run, so that each set of times
    comes from one run and adds up (step = forward + sampling arithmetic)."""
    return {name: value for key in keys for name, value in ((key, median[key]), (f"{key}_min", fastest[key]))}


def _benchmark_decode(tokenizer: VQGAN | None, tokens: Tensor, *, device: torch.device, repeats: int, warmup: int,
                      tiles: int | None) -> dict[str, Any]:
    """Decode times (median and min), FLOPs and memory. No fraction of the matmul peak: convolution
    FLOPs are counted as direct convolution, which Winograd kernels beat with fewer multiplies, so
    such a fraction can exceed 1 (see the README)."""
    keys = ("decode_seconds", "decode_seconds_min", "decode_flops", "decode_flops_per_second",
            "decode_peak_memory_bytes", "decode_memory_increase_bytes", "decode_peak_memory_reserved_bytes")
    if tokenizer is None:
        return dict.fromkeys(keys)
    run = decoding_run(tokenizer, tokens, tiles=tiles)
    decode_flops = count_flops(run)
    for _ in range(warmup):
        run()
    with track_peak_memory(device) as memory:
        seconds = minimum_and_median([time_call(run, device)[1] for _ in range(repeats)])
    return dict(zip(keys, (seconds["median"], seconds["min"], decode_flops, decode_flops / seconds["median"],
                           memory.peak_bytes, memory.increase_bytes, memory.reserved_bytes)))


def run_benchmark(
    *,
    preset: str,
    steps: int = 100,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: str = "auto",
    compile: bool = False,
    cuda_graphs: bool = False,
    early_stop: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device | None = None,
    decode: bool = True,
    decode_tiles: int | None = None,
    channels_last: bool | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Time ``steps`` sampling steps of a Table 3 prior plus decoding, against the device's matmul rate.

    The settings are those of :func:`sundae.speed.time_sampling`. With ``early_stop`` and random
    weights samples almost never stop (the logits are nearly uniform, so some token always
    changes): the figures are then those of full T-step runs.

    Returns a JSON-able dict: settings, device facts, load averages, one entry per batch size in
    ``results`` (see the README beside this file for every key) and a one-line ``summary``.
    """
    load_before = load_average()
    models = benchmark_models(preset=preset, steps=steps, batch_sizes=batch_sizes, dtype=dtype, compile=compile,
                              cuda_graphs=cuda_graphs, repeats=repeats, warmup=warmup, device=device, decode=decode,
                              decode_tiles=decode_tiles, channels_last=channels_last, tokenizer=tokenizer)
    results = [benchmark_batch(models, batch=batch, steps=steps, early_stop=early_stop, repeats=repeats,
                               warmup=warmup, decode_tiles=decode_tiles) for batch in batch_sizes]
    prior_config = models.prior.config
    result = {
        "preset": preset,
        "tokenizer": models.tokenizer_name if decode else None,
        "image_size": models.image_size,
        "latent_shape": list(prior_config.latent_shape),
        "codebook_size": prior_config.codebook_size,
        "prior_parameters": count_parameters(models.prior),
        "tokenizer_parameters": None if models.tokenizer is None else count_parameters(models.tokenizer),
        "steps": steps,
        "dtype": str(models.dtype).removeprefix("torch."),
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "early_stop": early_stop,
        "compaction_interval": benchmark_sampling_options(steps=steps, early_stop=early_stop).compaction_interval,
        "decode": decode,
        "decode_tiles": decode_tiles,
        "channels_last": models.channels_last if decode else None,
        "repeats": repeats,
        "warmup": warmup,
        "device": device_facts(models.device),
        "torch_version": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "results": results,
    }
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> str:
    """One line: the setting, then per batch size the step, prior, decode and per-image times and the peak fraction."""
    parts = []
    for entry in result["results"]:
        decode_text = "" if entry["decode_seconds"] is None else f" + decode {format_seconds(entry['decode_seconds'])}"
        memory = "" if entry["peak_memory_bytes"] is None else f", peak {entry['peak_memory_bytes'] / 2**30:.2f} GiB"
        forward = entry["forward_fraction_of_matmul_peak"]
        forward_text = "" if forward is None else (
            f" (forward alone {forward:.2f}; sampling arithmetic "
            f"{format_seconds(entry['sampling_seconds_per_step'])}/step)")
        parts.append(
            f"batch {entry['batch_size']}: {format_seconds(entry['step_seconds'])}/step, prior "
            f"{format_seconds(entry['prior_seconds'])}{decode_text} = {format_seconds(entry['seconds_per_image'])}"
            f"/image ({entry['images_per_second']:.3g} images/s); prior {entry['achieved_flops_per_second'] / 1e9:.4g} "
            f"GFLOP/s = {entry['fraction_of_matmul_peak']:.2f} of the peak matmul "
            f"{entry['matmul_flops_per_second'] / 1e9:.4g} GFLOP/s{forward_text}; {entry['operators_per_step']} eager "
            f"ops/step{memory}"
        )
    return f"{setting_line(result)}: " + "; ".join(parts)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON (atomically: temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)
    return path


def result_filename(result: dict[str, Any], suffix: str | None = None) -> str:
    """``<device>-<preset>[-suffix].json``: ``cpu-ffhq1024.json``, ``nvidia-h100-80gb-hbm3-ffhq1024.json``."""
    facts = result["device"]
    device = "cpu" if facts["type"] == "cpu" else facts["name"]
    parts = (device, result["preset"], suffix)
    return "-".join(re.sub(r"[^a-z0-9.]+", "-", part.lower()).strip("-") for part in parts if part) + ".json"


def training_suffix(result: dict[str, Any], suffix: str | None) -> str:
    """``train-<step>-<dtype>[-compile][-ddp<N>][-suffix]``: one file name per training setting."""
    setting = result.get("parallel", result)
    parts = ["train", result["training_step"], setting["dtype"], "compile" if setting["compile"] else None,
             f"ddp{result['ranks']}" if "ranks" in result else None, suffix]
    return "-".join(part for part in parts if part)


# --- figures no measurement can give ---------------------------------------------------------

NOT_SPEED_RESULTS = ("quality-", "sweep-", "ablation-", "fault-suite")  # result files of other kinds


def impossible_figures(result: Any, where: str = "") -> list[str]:
    """Every figure of ``result`` (nested dicts and lists searched) that no measurement can give: a time
    <= 0, a fraction of a peak outside (0, 1], a step's forward or sampling arithmetic outside [0, step]."""
    if isinstance(result, list):
        return [problem for index, item in enumerate(result)
                for problem in impossible_figures(item, f"{where}[{index}]")]
    if not isinstance(result, dict):
        return []
    problems = []
    for key, value in result.items():
        path = f"{where}.{key}" if where else key
        problems += _figure_problems(key, value, path) + impossible_figures(value, path)
    step = result.get("step_seconds")
    for part in ("forward_seconds", "sampling_seconds_per_step"):
        if _is_number(step) and _is_number(result.get(part)) and result[part] > step:
            path = f"{where}.{part}" if where else part
            problems.append(f"{path} = {result[part]:.4g} exceeds step_seconds = {step:.4g}")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure_problems(key: str, value: Any, path: str) -> list[str]:
    numbers = [item for item in (value if isinstance(value, list) else [value]) if _is_number(item)]
    if "fraction" in key and any(not 0 < number <= 1 for number in numbers):
        return [f"{path} = {value}: a fraction of a peak lies in (0, 1]"]
    if key.startswith("sampling_seconds") and any(number < 0 for number in numbers):
        return [f"{path} = {value}: the sampling arithmetic cannot take negative time"]
    if "seconds" in key and not key.startswith("sampling_seconds") and any(number <= 0 for number in numbers):
        return [f"{path} = {value}: a time is > 0"]
    return []


def impossible_result_files(directory: Path = RESULTS) -> dict[str, list[str]]:
    """The speed result files in ``directory`` with impossible figures, and what is wrong in each."""
    found = {}
    for path in sorted(directory.glob("*.json")):
        if not path.name.startswith(NOT_SPEED_RESULTS):
            problems = impossible_figures(json.loads(path.read_text()))
            if problems:
                found[path.name] = problems
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="Sampling or training speed against the measured matmul rate "
                                                 "(one JSON file), or a check of the saved result files.")
    parser.add_argument("--preset", default="ffhq256", help="a prior preset (sampling: one of "
                        f"{', '.join(sorted(PRESET_TOKENIZERS))})")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,16")
    parser.add_argument("--dtype", "--precision", dest="dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--early-stop", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default: 1 run, 2 training steps)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--train", nargs="?", const="prior", choices=TRAINING_STEPS, default=None,
                        help="time training steps: --train (the prior's) or --train tokenizer")
    parser.add_argument("--model", default=None, help="with --train: a shipped model's name or a model directory")
    parser.add_argument("--tokenizer", default=None, help="with --train tokenizer: a VQ-GAN preset")
    parser.add_argument("--unroll-steps", type=int, default=None)
    parser.add_argument("--perceptual", default="auto",
                        help="with --train tokenizer: auto, lpips-vgg, stlpips-vgg or none")
    parser.add_argument("--ddp", type=int, default=None, metavar="RANKS",
                        help="with --train: DDP efficiency of the prior's step over RANKS CPU processes (gloo)")
    parser.add_argument("--threads-per-rank", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="list the result files with impossible figures")
    parser.add_argument("--suffix", default=None, help="file name suffix: results/<device>-<preset>-<suffix>.json")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if arguments.check:
        found = impossible_result_files(arguments.out_dir)
        for name, problems in found.items():
            print(f"{name}: {'; '.join(problems)}")
        raise SystemExit(1 if found else 0)
    sizes = tuple(int(value) for value in arguments.batch_sizes.split(","))
    if arguments.train is None:
        result = run_benchmark(preset=arguments.preset, steps=arguments.steps, batch_sizes=sizes,
                               dtype=arguments.dtype, compile=arguments.compile, cuda_graphs=arguments.cuda_graphs,
                               early_stop=arguments.early_stop, repeats=arguments.repeats,
                               warmup=1 if arguments.warmup is None else arguments.warmup, device=arguments.device)
        suffix = arguments.suffix
    else:
        result = run_training_benchmark(arguments, batch_sizes=sizes)
        suffix = training_suffix(result, arguments.suffix)
    path = write_json(result, arguments.out_dir / result_filename(result, suffix))
    print(f"{path}: {result['summary']}", flush=True)


def run_training_benchmark(arguments: argparse.Namespace, *, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """``--train``: the training step of :mod:`sundae.training.benchmark` the arguments name."""
    shared = {"preset": None if arguments.model is not None else arguments.preset, "model": arguments.model,
              "batch_sizes": batch_sizes, "precision": arguments.dtype, "repeats": arguments.repeats,
              "warmup": 2 if arguments.warmup is None else arguments.warmup}
    if arguments.train == "tokenizer":
        return time_tokenizer_training(tokenizer=arguments.tokenizer, perceptual=arguments.perceptual,
                                       device=arguments.device, **shared)
    settings = {"compile": arguments.compile, "unroll_steps": arguments.unroll_steps, **shared}
    if arguments.ddp is not None:
        return ddp_scaling(ranks=arguments.ddp, threads_per_rank=arguments.threads_per_rank, **settings)
    return time_prior_training(device=arguments.device, **settings)


if __name__ == "__main__":
    main()
