"""Sampling speed measured against the hardware limit (paper §1, §4.1 and Fig. 1: a 1024² FFHQ
sample, T = 100 prior steps plus VQ-GAN decoding, in about 2 s on a GTX 1080Ti).

:func:`run_benchmark` builds a Table 3 prior and its tokenizer with random weights (speed does
not depend on training), runs the real sampling loop of :mod:`sundae.sampler` for ``steps``
steps at each batch size, decodes the tokens, and reports wall-clock times next to the work
done: the FLOPs of one prior step and of one decode, counted on the real modules with
:class:`torch.utils.flop_counter.FlopCounterMode`, and, measured in the same run, the device's
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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sundae.config import HOURGLASS_PRESETS, VQGAN_PRESETS, HourglassConfig, VQGANConfig
from sundae.config import preset as named_preset
from sundae.denoiser import Hourglass, count_parameters
from sundae.errors import InputError
from sundae.sampler import SampleOutput, SamplingOptions, sample
from sundae.runtime import autocast, cast_decoder, cast_linear_weights, resolve_device, resolve_precision
from sundae.tokenizer import VQGAN, decode_in_tiles

T = TypeVar("T")

# the tokenizer each prior preset samples for (paper Tables 3 and 4; §4.1 uses taming's f16 models)
PRESET_TOKENIZERS: dict[str, str] = {
    "ffhq1024": "paper-ffhq1024-f32",
    "ffhq256": "taming-ffhq-f16-1024",
    "imagenet": "taming-imagenet-f16-1024",
    "tiny": "tiny-f4",
}
COMPACTION_INTERVAL = 10  # with early stopping: one host sync per 10 steps instead of every step
WARMUP_STEPS = 3  # warm-up runs only trigger compilation, CUDA-graph capture and allocator growth
MATMUL_REPEATS = 10
MATMUL_MIN_SECONDS = 0.05  # per timed matmul measurement
# how the CPU's OpenMP threads wait: on a shared machine spin-waiting collapses small parallel ops
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


log = logging.getLogger(__name__)


class BenchmarkError(InputError):
    """A benchmark setting is invalid; the message says which one and what to use instead."""


# --- measuring -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``function`` once; return its result and the seconds it took on ``device``."""
    if device.type != "cuda":
        started = time.perf_counter()
        result = function()
        return result, time.perf_counter() - started
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = function()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end) / 1000.0


def attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """Scores ``q @ kᵀ`` plus the weighted sum ``p @ v`` of an attention call, 2 FLOPs per multiply-add."""
    *batch, queries, width = query_shape
    keys = key_shape[-2]
    return 2 * math.prod(batch) * queries * keys * (width + value_shape[-1])


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it would count as 0
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``function`` runs (one real call)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        function()
    return counter.get_total_flops()


def median_seconds(function: Callable[[], Any], device: torch.device, *, repeats: int) -> float:
    return statistics.median(time_call(function, device)[1] for _ in range(repeats))


def measure_matmul_rate(rows: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                        repeats: int = MATMUL_REPEATS) -> float:
    """Dense matmul FLOP/s of ``(rows, dim) @ (dim, 4·dim)`` in ``dtype``: median of ``repeats`` timings
    of at least ``MATMUL_MIN_SECONDS`` each, after warm-up.

    The shape of the prior's feed-forward layer at full resolution: the rate a step could reach
    if it did nothing but its largest matmuls.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(rows, dim, generator=generator, device=device, dtype=dtype)
    right = torch.randn(dim, 4 * dim, generator=generator, device=device, dtype=dtype)

    def multiply(times: int) -> None:
        for _ in range(times):
            torch.mm(left, right)

    with torch.inference_mode():
        # a small product takes microseconds: time enough of them in a row for the timer and clocks
        _, once = time_call(lambda: multiply(2), device)
        times = max(1, math.ceil(MATMUL_MIN_SECONDS / max(once / 2, 1e-9)))
        seconds = median_seconds(lambda: multiply(times), device, repeats=repeats) / times
    return 2 * rows * dim * 4 * dim / seconds


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


# --- the models and knobs --------------------------------------------------------------------


def build_prior(config: HourglassConfig, device: torch.device, dtype: torch.dtype) -> Hourglass:
    """A prior with random weights (every multiply costs the same whatever the weights), its Linear
    weights in ``dtype`` as the pipeline holds them (:func:`sundae.runtime.cast_linear_weights`)."""
    torch.manual_seed(0)
    return cast_linear_weights(Hourglass(config).to(device).eval(), dtype)


def build_tokenizer(config: VQGANConfig, device: torch.device, *, dtype: torch.dtype,
                    channels_last: bool) -> VQGAN:
    """A VQ-GAN with random weights whose decoder runs in ``dtype`` (:func:`sundae.runtime.cast_decoder`)."""
    torch.manual_seed(0)
    return cast_decoder(VQGAN(config).to(device).eval(), dtype, channels_last=channels_last)


def compile_mode_for(*, compile: bool, cuda_graphs: bool) -> str | None:
    """The sampler's ``compile_mode``: the whole step (forward + sampling arithmetic) compiled in the
    warm-up, and with ``cuda_graphs`` replayed as one CUDA graph ("reduce-overhead"), which removes
    the per-kernel launch cost that dominates small batches."""
    if cuda_graphs and not compile:
        raise BenchmarkError("cuda_graphs needs compile=True (graphs are captured by torch.compile)")
    if not compile:
        return None
    return "reduce-overhead" if cuda_graphs else "default"


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


def benchmark_sampling_options(*, steps: int, early_stop: bool) -> SamplingOptions:
    """The sampler's defaults, with finished samples removed every ``COMPACTION_INTERVAL`` steps.

    Compaction costs one host sync; a sample frozen on the device already stops changing, so the
    interval changes the cost, never the tokens.
    """
    return SamplingOptions(steps=steps, early_stop=early_stop,
                           compaction_interval=COMPACTION_INTERVAL if early_stop else 1)


# --- the benchmark ---------------------------------------------------------------------------


def _class_labels(config: HourglassConfig, batch: int, device: torch.device) -> Tensor | None:
    if config.num_classes is None:
        return None
    return torch.arange(batch, device=device) % config.num_classes


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median prior time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def benchmark_batch(*, prior: Hourglass, compile_mode: str | None, tokenizer: VQGAN | None, batch: int, steps: int,
                    early_stop: bool, dtype: torch.dtype, device: torch.device, repeats: int, warmup: int,
                    decode_tiles: int | None) -> dict[str, Any]:
    """Every measurement at one batch size; see :func:`run_benchmark`.

    The forward alone is timed in eager mode only: a compiled step fuses the forward with the
    sampling arithmetic, and timing the forward apart would cost a second compilation.
    """
    config = prior.config
    log.info("bench: batch %d, %d steps, %d warm-up + %d timed runs ...", batch, steps, warmup, repeats)
    time_forward = compile_mode is None
    grid = tuple(config.latent_shape)
    labels = _class_labels(config, batch, device)
    with torch.inference_mode():
        tokens = torch.randint(0, config.codebook_size, (batch, *grid), device=device,
                               generator=torch.Generator(device=device).manual_seed(0))
    options = benchmark_sampling_options(steps=steps, early_stop=early_stop)

    def run_sampler(options: SamplingOptions, mode: str | None = compile_mode) -> SampleOutput:
        with autocast(device, dtype):
            return sample(prior, options=options, num_samples=batch, grid_shape=grid, class_labels=labels,
                          seeds=torch.arange(batch), compile_mode=mode)

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
    result.update(_benchmark_decode(tokenizer, output.tokens, device=device, repeats=repeats, warmup=warmup,
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

    def run() -> Tensor:
        with torch.inference_mode():
            return decode_in_tiles(tokenizer, tokens, tiles=tiles)

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

    Args:
        preset: a prior preset with a known tokenizer (:data:`PRESET_TOKENIZERS`), e.g. ``"ffhq1024"``.
        steps: sampling steps T (the paper's 1024² figure uses 100).
        batch_sizes: batch sizes to measure, one result each.
        dtype: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"float32"`` or ``"bfloat16"``; in bf16
            the decoder runs with bf16 weights.
        compile: ``torch.compile`` the whole sampling step (forward + sampling arithmetic) for its fixed
            shape, compiled in the warm-up (:func:`sundae.sampler.step_function`).
        cuda_graphs: with ``compile``, replay each step as a CUDA graph (CUDA only).
        early_stop: let samples stop on their own. With random weights this almost never triggers
            (the logits are nearly uniform, so some token always changes): the figures are then
            those of full T-step runs.
        repeats: timed runs per measurement; times are medians. ``warmup``: untimed runs first.
        device: ``"cpu"``, ``"cuda"``, ...; None: CUDA when available.
        decode: also decode the sampled tokens with the preset's tokenizer.
        decode_tiles: decode as ``tiles × tiles`` pieces to bound memory (approximate at seams).
        channels_last: channels-last decoder; None: on for CUDA.
        tokenizer: a :data:`~sundae.config.VQGAN_PRESETS` name instead of the preset's own.

    Returns a JSON-able dict: settings, device facts, load averages, one entry per batch size in
    ``results`` (see the README in ``benchmarks/`` for every key) and a one-line ``summary``.
    """
    device = resolve_device(device)
    torch_dtype = resolve_precision(dtype, device)
    _check_settings(preset=preset, steps=steps, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup,
                    cuda_graphs=cuda_graphs, device=device, tokenizer=tokenizer, decode_tiles=decode_tiles)
    prior_config = named_preset(preset, HOURGLASS_PRESETS)
    tokenizer_name = tokenizer if tokenizer is not None else PRESET_TOKENIZERS[preset]
    # the prior's codebook size, so every sampled token is a valid code (equal for the paper pairs)
    tokenizer_config = named_preset(tokenizer_name, VQGAN_PRESETS).replace(
        codebook_size=prior_config.codebook_size)
    channels_last = device.type == "cuda" if channels_last is None else channels_last

    load_before = load_average()
    prior = build_prior(prior_config, device, torch_dtype)
    compile_mode = compile_mode_for(compile=compile, cuda_graphs=cuda_graphs)
    vqgan = None
    if decode:
        vqgan = build_tokenizer(tokenizer_config, device, dtype=torch_dtype, channels_last=channels_last)
    results = [
        benchmark_batch(prior=prior, compile_mode=compile_mode, tokenizer=vqgan,
                        batch=batch, steps=steps, early_stop=early_stop, dtype=torch_dtype, device=device,
                        repeats=repeats, warmup=warmup, decode_tiles=decode_tiles)
        for batch in batch_sizes
    ]
    image_size = [side * tokenizer_config.downsample_factor for side in prior_config.latent_shape]
    result = {
        "preset": preset,
        "tokenizer": tokenizer_name if decode else None,
        "image_size": image_size,
        "latent_shape": list(prior_config.latent_shape),
        "codebook_size": prior_config.codebook_size,
        "prior_parameters": count_parameters(prior),
        "tokenizer_parameters": None if vqgan is None else count_parameters(vqgan),
        "steps": steps,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "early_stop": early_stop,
        "compaction_interval": benchmark_sampling_options(steps=steps, early_stop=early_stop).compaction_interval,
        "decode": decode,
        "decode_tiles": decode_tiles,
        "channels_last": channels_last if decode else None,
        "repeats": repeats,
        "warmup": warmup,
        "device": device_facts(device),
        "torch_version": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "results": results,
    }
    result["summary"] = summarize(result)
    return result


def _check_settings(*, preset: str, steps: int, batch_sizes: tuple[int, ...], repeats: int, warmup: int,
                    cuda_graphs: bool, device: torch.device, tokenizer: str | None,
                    decode_tiles: int | None) -> None:
    if tokenizer is None and preset not in PRESET_TOKENIZERS:
        raise BenchmarkError(f"preset {preset!r} has no tokenizer to decode with; choose one of "
                             f"{', '.join(sorted(PRESET_TOKENIZERS))} or name a tokenizer preset")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise BenchmarkError(f"need steps >= 1, repeats >= 1 and warmup >= 0, got {steps}, {repeats}, {warmup}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise BenchmarkError(f"batch sizes must be >= 1, got {tuple(batch_sizes)}")
    if cuda_graphs and device.type != "cuda":
        raise BenchmarkError("cuda_graphs needs a CUDA device")
    if decode_tiles is not None and decode_tiles < 1:
        raise BenchmarkError(f"decode_tiles must be >= 1 or None, got {decode_tiles}")


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summarize(result: dict[str, Any]) -> str:
    """One line: the setting, then per batch size the step, prior, decode and per-image times and the peak fraction."""
    device = result["device"]
    threads = f", {device['threads']} threads" if "threads" in device else ""
    knobs = "".join(f", {name}" for name in ("compile", "cuda_graphs", "early_stop") if result[name])
    head = (f"{result['preset']} {result['image_size'][0]}x{result['image_size'][1]} T={result['steps']} on "
            f"{device['name']} ({device['type']}{threads}, {result['dtype']}{knobs})")
    parts = []
    for entry in result["results"]:
        decode_text = "" if entry["decode_seconds"] is None else f" + decode {_format_seconds(entry['decode_seconds'])}"
        memory = "" if entry["peak_memory_bytes"] is None else f", peak {entry['peak_memory_bytes'] / 2**30:.2f} GiB"
        forward = entry["forward_fraction_of_matmul_peak"]
        forward_text = "" if forward is None else f" (forward alone {forward:.2f})"
        parts.append(
            f"batch {entry['batch_size']}: {_format_seconds(entry['step_seconds'])}/step, prior "
            f"{_format_seconds(entry['prior_seconds'])}{decode_text} = {_format_seconds(entry['seconds_per_image'])}"
            f"/image ({entry['images_per_second']:.3g} images/s); prior {entry['achieved_flops_per_second'] / 1e9:.4g} "
            f"GFLOP/s = {entry['fraction_of_matmul_peak']:.2f} of matmul {entry['matmul_flops_per_second'] / 1e9:.4g} "
            f"GFLOP/s{forward_text}; {entry['operators_per_step']} eager "
            f"ops/step{memory}"
        )
    return f"{head}: " + "; ".join(parts)


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


__all__ = [
    "BenchmarkError", "PRESET_TOKENIZERS", "benchmark_sampling_options", "compile_mode_for", "count_flops",
    "count_operators", "measure_matmul_rate", "peak_tensor_bytes", "result_filename", "run_benchmark", "summarize",
    "write_json",
]
