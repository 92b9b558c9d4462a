"""The speed harness: sampling speed measured against the hardware limit (paper §1, §4.1 and
Fig. 1: a 1024² FFHQ sample, T = 100 prior steps plus VQ-GAN decoding, in about 2 s on a GTX
1080Ti). Not part of the installed package: run from a source checkout.

:func:`run_benchmark` samples with the random-weight models of :mod:`sundae.speed` (what
``sundae bench`` times) and reports wall-clock times next to the work done: the FLOPs of one
prior step and of one decode, counted on the real modules
(:func:`sundae.training.throughput.count_flops`), and, measured in the same run, the device's
dense matmul rate at the prior's width ``(batch·tokens, dim) @ (dim, 4·dim)`` in the same dtype.
The ratio of the two says how far the prior step (network forward *and* the sampling arithmetic
over the ``v`` logits) is from the hardware limit.

Timing: on CUDA the device is synchronised (and CUDA events recorded) only at the boundaries of
a measured region, never inside the sampling loop; on CPU ``time.perf_counter`` is used.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) over a
measured region, weights included. On CPU the process's peak resident set size (``VmHWM`` in
``/proc/self/status``), reset at the start of the region through ``/proc/self/clear_refs``
(Linux >= 4.0); where that file is not writable, ``resource.getrusage``'s lifetime peak is used,
which only shows growth beyond earlier peaks. The increase over the resident size at the start
of the region is reported too (the working memory of the region alone).

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
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from sundae.denoiser import count_parameters
from sundae.runtime import autocast
from sundae.speed import (
    PRESET_TOKENIZERS, WARMUP_STEPS, BenchmarkError, BenchmarkModels, benchmark_models, benchmark_sampling_options,
    class_labels_for, decoding_run, format_seconds, median_seconds, sampling_run, setting_line, time_call,
)
from sundae.tokenizer import VQGAN
from sundae.training.throughput import count_flops, measure_matmul_rate

# how the CPU's OpenMP threads wait: on a shared machine spin-waiting collapses small parallel ops
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger(__name__)


# --- measuring -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", status, flags=re.MULTILINE)
    return None if match is None else int(match.group(1)) * 1024


def _reset_resident_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class MemoryPeak:
    """Peak memory of a region: see the module docstring for what is measured on each device."""

    peak_bytes: int | None = None
    increase_bytes: int | None = None
    reserved_bytes: int | None = None
    method: str = ""


@contextlib.contextmanager
def track_peak_memory(device: torch.device) -> Iterator[MemoryPeak]:
    peak = MemoryPeak()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()  # so that the reserved peak is this region's, not earlier regions' leftovers
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield peak
        synchronize(device)
        peak.peak_bytes = torch.cuda.max_memory_allocated(device)
        peak.reserved_bytes = torch.cuda.max_memory_reserved(device)
        peak.increase_bytes = peak.peak_bytes - start
        peak.method = "torch.cuda.max_memory_allocated (weights included)"
        return
    start = _resident_bytes("VmRSS")
    if _reset_resident_peak() and start is not None:
        yield peak
        peak.peak_bytes = _resident_bytes("VmHWM")
        peak.method = "peak resident set size (VmHWM after resetting it via /proc/self/clear_refs)"
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield peak
        peak.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak.method = "growth of the lifetime peak resident set size (getrusage ru_maxrss)"
    peak.increase_bytes = None if peak.peak_bytes is None else max(0, peak.peak_bytes - start)


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


def device_facts(device: torch.device) -> dict[str, Any]:
    """Name, kind and parallelism of the device the benchmark runs on."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "memory_bytes": properties.total_memory,
                "multiprocessors": properties.multi_processor_count, "cuda_version": torch.version.cuda}
    return {"type": device.type, "name": _cpu_model(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "environment": {name: os.environ.get(name) for name in THREAD_VARIABLES}}


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "unknown CPU"


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages: how busy a shared machine was while measuring."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


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


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median prior time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def benchmark_batch(models: BenchmarkModels, *, batch: int, steps: int, early_stop: bool, repeats: int, warmup: int,
                    decode_tiles: int | None) -> dict[str, Any]:
    """Every measurement at one batch size; see :func:`run_benchmark`.

    The forward alone is timed in eager mode only: a compiled step fuses the forward with the
    sampling arithmetic, and timing the forward apart would cost a second compilation.
    """
    prior, device, dtype = models.prior, models.device, models.dtype
    config = prior.config
    log.info("bench: batch %d, %d steps, %d warm-up + %d timed runs ...", batch, steps, warmup, repeats)
    time_forward = models.compile_mode is None
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
    matmul_shape = (batch * math.prod(grid), config.dim)
    warmup_options = benchmark_sampling_options(steps=min(steps, WARMUP_STEPS), early_stop=early_stop)
    for _ in range(warmup):
        run_sampler(warmup_options)
        forward()
    # a shared machine's speed drifts: each run is compared with the matmul rates measured just
    # before and after it, and the fractions are medians over runs
    rates = [measure_matmul_rate(*matmul_shape, dtype=dtype, device=device)]
    runs = []
    for _ in range(repeats):
        forward_seconds = time_call(forward, device)[1] if time_forward else None
        with track_peak_memory(device) as memory:
            output, seconds = time_call(lambda: run_sampler(options), device)
        rates.append(measure_matmul_rate(*matmul_shape, dtype=dtype, device=device))
        matmul_rate = (rates[-2] + rates[-1]) / 2
        # FLOPs are linear in the batch: samples removed by compaction cost nothing
        flops_per_second = flops_per_step / batch * sum(output.forward_rows) / seconds
        runs.append({"seconds": seconds, "iterations": len(output.forward_rows), "output": output, "memory": memory,
                     "forward_seconds": forward_seconds, "matmul_rate": matmul_rate,
                     "flops_per_second": flops_per_second, "fraction": flops_per_second / matmul_rate,
                     "forward_fraction": flops_per_step / forward_seconds / matmul_rate if time_forward else None})
    median = _median_run(runs)
    output = median["output"]
    forward_seconds = statistics.median(run["forward_seconds"] for run in runs) if time_forward else None
    step_seconds = median["seconds"] / median["iterations"]
    matmul_rate = statistics.median(run["matmul_rate"] for run in runs)
    memory = max((run["memory"] for run in runs), key=lambda peak: peak.peak_bytes or 0)

    result: dict[str, Any] = {
        "batch_size": batch,
        "step_seconds": step_seconds,
        "forward_seconds": forward_seconds,
        "sampling_seconds_per_step": step_seconds - forward_seconds if time_forward else None,
        "prior_seconds": median["seconds"],
        "prior_seconds_all_repeats": [run["seconds"] for run in runs],
        "iterations": median["iterations"],
        "mean_steps_taken": output.steps_taken.float().mean().item(),
        "flops_per_step": flops_per_step,
        "operators_per_step": operators_per_step,
        "forward_operators": forward_operators,
        "sampling_operators_per_step": operators_per_step - forward_operators,
        "flops_per_sample_step": flops_per_step / batch,
        "achieved_flops_per_second": median["flops_per_second"],
        "forward_flops_per_second": flops_per_step / forward_seconds if time_forward else None,
        "matmul_flops_per_second": matmul_rate,
        "matmul_flops_per_second_all_repeats": [run["matmul_rate"] for run in runs],
        "matmul_shape": [*matmul_shape, 4 * config.dim],
        "fraction_of_matmul_peak": statistics.median(run["fraction"] for run in runs),
        "fraction_of_matmul_peak_all_repeats": [run["fraction"] for run in runs],
        "forward_fraction_of_matmul_peak": (statistics.median(run["forward_fraction"] for run in runs)
                                            if time_forward else None),
        "prior_peak_memory_bytes": memory.peak_bytes,
        "prior_memory_increase_bytes": memory.increase_bytes,
        "prior_peak_memory_reserved_bytes": memory.reserved_bytes,
        "memory_method": memory.method,
    }
    result.update(_benchmark_decode(models.tokenizer, output.tokens, device=device, repeats=repeats, warmup=warmup,
                                    tiles=decode_tiles, matmul_rate=matmul_rate))
    end_to_end = median["seconds"] + (result["decode_seconds"] or 0.0)
    result["seconds_per_image"] = end_to_end / batch
    result["images_per_second"] = batch / end_to_end
    peaks = [value for value in (memory.peak_bytes, result["decode_peak_memory_bytes"]) if value is not None]
    result["peak_memory_bytes"] = max(peaks, default=None)
    return result


def _benchmark_decode(tokenizer: VQGAN | None, tokens: Tensor, *, device: torch.device, repeats: int, warmup: int,
                      tiles: int | None, matmul_rate: float) -> dict[str, Any]:
    keys = ("decode_seconds", "decode_flops", "decode_flops_per_second", "decode_fraction_of_matmul_peak",
            "decode_peak_memory_bytes", "decode_memory_increase_bytes", "decode_peak_memory_reserved_bytes")
    if tokenizer is None:
        return dict.fromkeys(keys)
    run = decoding_run(tokenizer, tokens, tiles=tiles)
    decode_flops = count_flops(run)
    for _ in range(warmup):
        run()
    with track_peak_memory(device) as memory:
        seconds = median_seconds(run, device, repeats=repeats)
    return dict(zip(keys, (seconds, decode_flops, decode_flops / seconds, decode_flops / seconds / matmul_rate,
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
        forward_text = "" if forward is None else f" (forward alone {forward:.2f})"
        parts.append(
            f"batch {entry['batch_size']}: {format_seconds(entry['step_seconds'])}/step, prior "
            f"{format_seconds(entry['prior_seconds'])}{decode_text} = {format_seconds(entry['seconds_per_image'])}"
            f"/image ({entry['images_per_second']:.3g} images/s); prior {entry['achieved_flops_per_second'] / 1e9:.4g} "
            f"GFLOP/s = {entry['fraction_of_matmul_peak']:.2f} of matmul {entry['matmul_flops_per_second'] / 1e9:.4g} "
            f"GFLOP/s{forward_text}; {entry['operators_per_step']} eager "
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
    device = "cpu" if facts["type"] == "cpu" else re.sub(r"[^a-z0-9]+", "-", facts["name"].lower())
    return "-".join(part.strip("-") for part in (device, result["preset"], suffix) if part) + ".json"


def main() -> None:
    parser = argparse.ArgumentParser(description="Sampling speed against the measured matmul rate (one JSON file).")
    parser.add_argument("--preset", default="ffhq256", choices=sorted(PRESET_TOKENIZERS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,16")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--early-stop", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--suffix", default=None, help="file name suffix: results/<device>-<preset>-<suffix>.json")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_benchmark(preset=arguments.preset, steps=arguments.steps,
                           batch_sizes=tuple(int(value) for value in arguments.batch_sizes.split(",")),
                           dtype=arguments.dtype, compile=arguments.compile, cuda_graphs=arguments.cuda_graphs,
                           early_stop=arguments.early_stop, repeats=arguments.repeats, warmup=arguments.warmup,
                           device=arguments.device)
    path = write_json(result, arguments.out_dir / result_filename(result, arguments.suffix))
    print(f"{path}: {result['summary']}", flush=True)


if __name__ == "__main__":
    main()
