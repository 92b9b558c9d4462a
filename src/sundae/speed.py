"""Sampling speed on this machine (paper §1, §4.1 and Fig. 1: a 1024² FFHQ sample, T = 100 prior
steps plus VQ-GAN decoding, in about 2 s on a GTX 1080Ti): what ``sundae bench`` and
``sundae describe`` time.

:func:`time_sampling` builds a Table 3 prior and its tokenizer with random weights (speed does
not depend on training), runs the real sampling loop of :mod:`sundae.sampler` for ``steps``
steps at each batch size, decodes the tokens, and reports the median wall-clock times. On CUDA
the device is synchronised only at the boundaries of a timed region, never inside the sampling
loop; on CPU ``time.perf_counter`` is used.

The full analysis (FLOPs of a step against the device's measured matmul rate, eager operator
counts, CPU peak memory, result files) is the speed harness in the repository's
``benchmarks/speed.py``, built on the pieces here; the training-step benchmark is
:mod:`sundae.training.benchmark`. The measuring pieces both share live here: the timers (a whole
region, and the network forwards inside it, :class:`ForwardTimer`), the peak matmul rate
(:func:`peak_matmul_rate`), peak memory (:func:`track_peak_memory`) and the device facts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sundae.config import HOURGLASS_PRESETS, VQGAN_PRESETS, HourglassConfig, VQGANConfig
from sundae.config import preset as named_preset
from sundae.denoiser import Hourglass
from sundae.errors import InputError
from sundae.runtime import autocast, cast_decoder, cast_linear_weights, resolve_device, resolve_precision
from sundae.sampler import SampleOutput, SamplingOptions, sample
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
MATMUL_PEAK_REPEATS = 3  # timings per shape in one peak measurement (each at least 50 ms of matmuls)
MATMUL_PEAK_MAX_ROWS = 8192  # the larger peak shapes stop growing here (a bigger product is no faster)
# how the CPU's OpenMP threads wait: on a shared machine spin-waiting collapses small parallel ops
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

log = logging.getLogger(__name__)


class BenchmarkError(InputError):
    """A benchmark setting is invalid; the message says which one and what to use instead."""


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


def median_seconds(function: Callable[[], Any], device: torch.device, *, repeats: int) -> float:
    return statistics.median(time_call(function, device)[1] for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ForwardTimer:
    """The seconds spent inside ``module``'s forward calls while the timer is entered: the network's
    share of a timed sampling run, measured in that same run (so it can never exceed the run's time).

    Forward hooks read ``time.perf_counter`` on the CPU; on CUDA they record an event pair on the
    stream (no sync inside the loop), and :attr:`seconds` syncs once when read. A compiled step runs
    the forward inside one graph, where no hook can fire: time eager runs only.
    """

    module: nn.Module
    device: torch.device
    host_seconds: float = 0.0
    events: list[tuple[Any, Any]] = field(default_factory=list)
    calls: int = 0
    _started: float = 0.0
    _handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> ForwardTimer:
        self._handles = [self.module.register_forward_pre_hook(self._start),
                         self.module.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exception: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _start(self, module: nn.Module, arguments: tuple) -> None:
        if self.device.type == "cuda":
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._started = time.perf_counter()

    def _stop(self, module: nn.Module, arguments: tuple, output: Any) -> None:
        self.calls += 1
        if self.device.type == "cuda":
            self.events[-1][1].record()
        else:
            self.host_seconds += time.perf_counter() - self._started

    @property
    def seconds(self) -> float:
        if not self.events:
            return self.host_seconds
        self.events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1000.0


# --- FLOPs and the matmul rate ------------------------------------------------------------


MATMUL_REPEATS = 10
MATMUL_MIN_SECONDS = 0.05  # per timed matmul measurement


def attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """Scores ``q @ kᵀ`` plus the weighted sum ``p @ v`` of an attention call, 2 FLOPs per multiply-add."""
    *batch, queries, width = query_shape
    keys = key_shape[-2]
    return 2 * math.prod(batch) * queries * keys * (width + value_shape[-1])


def attention_backward_flops(grad_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size,
                             value_shape: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """The gradients of ``q``, ``k`` and ``v``: twice the forward's two products, as torch counts the
    CUDA kernels' backward."""
    return 2 * attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU ones, which it would count as 0
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
                        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops}


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention, forward and backward, that ``function`` runs
    (one real call)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        function()
    return counter.get_total_flops()


def measure_matmul_rate(rows: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                        repeats: int = MATMUL_REPEATS) -> float:
    """Dense matmul FLOP/s of ``(rows, dim) @ (dim, 4·dim)`` in ``dtype``: median of ``repeats`` timings
    of at least ``MATMUL_MIN_SECONDS`` each, after warm-up.

    The shape of a transformer's feed-forward layer: the rate a step could reach if it did nothing
    but its largest matmuls.
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


def matmul_shapes(rows: int, dim: int) -> list[tuple[int, int]]:
    """``(rows, dim)`` pairs of the peak measurement (:func:`peak_matmul_rate`): the model's own
    feed-forward shape, and 4x the rows and 2x the width (rows at most ``MATMUL_PEAK_MAX_ROWS``).

    A small model's own shape under-uses the device, and a "peak" measured at one shape is beaten
    by the step's larger matmuls: a fraction of it can then exceed 1.
    """
    return sorted({(min(max_rows, MATMUL_PEAK_MAX_ROWS), width)
                   for max_rows in (rows, 4 * rows) for width in (dim, 2 * dim)})


def peak_matmul_rate(shapes: list[tuple[int, int]], *, dtype: torch.dtype, device: torch.device) -> float:
    """The best dense-matmul FLOP/s over ``shapes`` (each ``(rows, dim) @ (dim, 4·dim)`` in ``dtype``,
    the median of ``MATMUL_PEAK_REPEATS`` timings): one measurement of the device's peak.

    Callers measure it around each timed run and keep the best, so that a step is compared with the
    fastest the device was seen to multiply, not with one noisy reading.
    """
    return max(measure_matmul_rate(rows, dim, dtype=dtype, device=device, repeats=MATMUL_PEAK_REPEATS)
               for rows, dim in shapes)


def minimum_and_median(values: list[float]) -> dict[str, float]:
    """``{"min": ..., "median": ...}`` of the timings of the repeats: the best the device did, and the typical."""
    return {"min": min(values), "median": statistics.median(values)}


# --- memory and device facts -----------------------------------------------------------------


def _resident_bytes(field_name: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, flags=re.MULTILINE)
    return None if match is None else int(match.group(1)) * 1024


def _reset_resident_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class MemoryPeak:
    """Peak memory of a region: see :func:`track_peak_memory` for what is measured on each device."""

    peak_bytes: int | None = None
    increase_bytes: int | None = None
    reserved_bytes: int | None = None
    method: str = ""


@contextlib.contextmanager
def track_peak_memory(device: torch.device) -> Iterator[MemoryPeak]:
    """Peak memory of the region inside the ``with``, filled in when it ends.

    CUDA: ``max_memory_allocated`` (and ``max_memory_reserved``), weights included. CPU: the
    process's peak resident set size (``VmHWM``), reset at the start through
    ``/proc/self/clear_refs`` (Linux >= 4.0); where that file is not writable, the growth of
    ``resource.getrusage``'s lifetime peak, which only shows growth beyond earlier peaks. The
    increase over the start of the region is the region's own working memory.
    """
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


def device_facts(device: torch.device) -> dict[str, Any]:
    """Name, kind and parallelism of the device a benchmark runs on."""
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


def time_forward(config: HourglassConfig, repeats: int = 3) -> float:
    """Median milliseconds of one forward pass (one sampling step) at batch 1 on the CPU, random weights."""
    device = torch.device("cpu")
    model = build_prior(config, device, torch.float32)
    tokens = torch.randint(0, config.codebook_size, (1, *config.latent_shape))
    labels = None if config.num_classes is None else torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        model(tokens, labels)  # warm-up
        return median_seconds(lambda: model(tokens, labels), device, repeats=repeats) * 1000


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


def benchmark_sampling_options(*, steps: int, early_stop: bool) -> SamplingOptions:
    """The sampler's defaults, with finished samples removed every ``COMPACTION_INTERVAL`` steps.

    Compaction costs one host sync; a sample frozen on the device already stops changing, so the
    interval changes the cost, never the tokens.
    """
    return SamplingOptions(steps=steps, early_stop=early_stop,
                           compaction_interval=COMPACTION_INTERVAL if early_stop else 1)


@dataclass
class BenchmarkModels:
    """What a speed run samples with, checked and built once for every batch size."""

    preset: str
    prior: Hourglass
    tokenizer: VQGAN | None  # None: the prior only
    tokenizer_name: str
    image_size: list[int]
    device: torch.device
    dtype: torch.dtype
    compile_mode: str | None
    channels_last: bool


def benchmark_models(*, preset: str, steps: int, batch_sizes: tuple[int, ...], dtype: str, compile: bool,
                     cuda_graphs: bool, repeats: int, warmup: int, device: str | torch.device | None, decode: bool,
                     decode_tiles: int | None, channels_last: bool | None, tokenizer: str | None) -> BenchmarkModels:
    """Check the settings of a speed run (see :func:`time_sampling`) and build its random-weight models."""
    device = resolve_device(device)
    torch_dtype = resolve_precision(dtype, device)
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
    compile_mode = compile_mode_for(compile=compile, cuda_graphs=cuda_graphs)
    prior_config = named_preset(preset, HOURGLASS_PRESETS)
    tokenizer_name = tokenizer if tokenizer is not None else PRESET_TOKENIZERS[preset]
    # the prior's codebook size, so every sampled token is a valid code (equal for the paper pairs)
    tokenizer_config = named_preset(tokenizer_name, VQGAN_PRESETS).replace(codebook_size=prior_config.codebook_size)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    vqgan = build_tokenizer(tokenizer_config, device, dtype=torch_dtype, channels_last=channels_last) if decode else None
    return BenchmarkModels(
        preset=preset, prior=build_prior(prior_config, device, torch_dtype), tokenizer=vqgan,
        tokenizer_name=tokenizer_name, device=device, dtype=torch_dtype, compile_mode=compile_mode,
        image_size=[side * tokenizer_config.downsample_factor for side in prior_config.latent_shape],
        channels_last=channels_last)


def class_labels_for(config: HourglassConfig, batch: int, device: torch.device) -> Tensor | None:
    """Labels cycling through the classes of a class-conditional prior; None for an unconditional one."""
    if config.num_classes is None:
        return None
    return torch.arange(batch, device=device) % config.num_classes


def sampling_run(models: BenchmarkModels, *, batch: int) -> Callable[..., SampleOutput]:
    """``run(options, compile_mode=...)``: one sampling run of ``batch`` samples (seeds 0..batch-1)."""
    prior, device = models.prior, models.device
    grid = tuple(prior.config.latent_shape)
    labels = class_labels_for(prior.config, batch, device)

    def run(options: SamplingOptions, compile_mode: str | None = models.compile_mode) -> SampleOutput:
        with autocast(device, models.dtype):
            return sample(prior, options=options, num_samples=batch, grid_shape=grid, class_labels=labels,
                          seeds=torch.arange(batch), compile_mode=compile_mode)

    return run


def decoding_run(tokenizer: VQGAN, tokens: Tensor, *, tiles: int | None) -> Callable[[], Tensor]:
    """``run()``: decode ``tokens`` to pixels, optionally in ``tiles × tiles`` pieces."""

    def run() -> Tensor:
        with torch.inference_mode():
            return decode_in_tiles(tokenizer, tokens, tiles=tiles)

    return run


# --- the user-facing timing (sundae bench) ---------------------------------------------------


def time_sampling(
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
    """Median time of ``steps`` sampling steps of a Table 3 prior plus decoding, per batch size.

    Args:
        preset: a prior preset with a known tokenizer (:data:`PRESET_TOKENIZERS`), e.g. ``"ffhq1024"``.
        steps: sampling steps T (the paper's 1024² figure uses 100).
        batch_sizes: batch sizes to measure, one result each.
        dtype: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"float32"`` or ``"bfloat16"``; in bf16
            the decoder runs with bf16 weights.
        compile: ``torch.compile`` the whole sampling step (forward + sampling arithmetic), compiled in
            the warm-up. ``cuda_graphs``: with ``compile``, replay each step as a CUDA graph (CUDA only).
        early_stop: let samples stop on their own (with random weights this almost never happens).
        repeats: timed runs per measurement; times are medians. ``warmup``: untimed runs first.
        device: ``"cpu"``, ``"cuda"``, ...; None: CUDA when available.
        decode: also decode the sampled tokens with the preset's tokenizer.
        decode_tiles: decode as ``tiles × tiles`` pieces to bound memory (approximate at seams).
        channels_last: channels-last decoder; None: on for CUDA.
        tokenizer: a :data:`~sundae.config.VQGAN_PRESETS` name instead of the preset's own.

    Returns a JSON-able dict: the settings, ``device``, one entry per batch size in ``results``
    (``step_seconds``, ``prior_seconds``, ``decode_seconds``, ``seconds_per_image``,
    ``images_per_second``, ``mean_steps_taken``, on CUDA ``peak_memory_bytes``) and a one-line ``summary``.
    """
    models = benchmark_models(preset=preset, steps=steps, batch_sizes=batch_sizes, dtype=dtype, compile=compile,
                              cuda_graphs=cuda_graphs, repeats=repeats, warmup=warmup, device=device, decode=decode,
                              decode_tiles=decode_tiles, channels_last=channels_last, tokenizer=tokenizer)
    options = benchmark_sampling_options(steps=steps, early_stop=early_stop)
    warmup_options = benchmark_sampling_options(steps=min(steps, WARMUP_STEPS), early_stop=early_stop)
    results = [_time_batch(models, batch=batch, options=options, warmup_options=warmup_options, repeats=repeats,
                           warmup=warmup, decode_tiles=decode_tiles) for batch in batch_sizes]
    device_type = models.device.type
    result = {
        "preset": preset, "tokenizer": models.tokenizer_name if decode else None, "image_size": models.image_size,
        "steps": steps, "dtype": str(models.dtype).removeprefix("torch."), "compile": compile,
        "cuda_graphs": cuda_graphs, "early_stop": early_stop, "decode": decode, "decode_tiles": decode_tiles,
        "repeats": repeats, "warmup": warmup,
        "device": {"type": device_type, "threads": torch.get_num_threads(),
                   "name": torch.cuda.get_device_name(models.device) if device_type == "cuda" else device_type},
        "torch_version": torch.__version__, "results": results,
    }
    result["summary"] = summarize_times(result)
    return result


def _time_batch(models: BenchmarkModels, *, batch: int, options: SamplingOptions, warmup_options: SamplingOptions,
                repeats: int, warmup: int, decode_tiles: int | None) -> dict[str, Any]:
    log.info("bench: batch %d, %d steps, %d warm-up + %d timed runs ...", batch, options.steps, warmup, repeats)
    run_sampler = sampling_run(models, batch=batch)
    cuda = models.device.type == "cuda"
    for _ in range(warmup):
        run_sampler(warmup_options)
    if cuda:
        torch.cuda.reset_peak_memory_stats(models.device)
    runs = sorted((time_call(lambda: run_sampler(options), models.device) for _ in range(repeats)),
                  key=lambda run: run[1])
    output, prior_seconds = runs[(len(runs) - 1) // 2]  # the median run (the lower middle one for an even count)
    decode_seconds = None
    if models.tokenizer is not None:
        decode = decoding_run(models.tokenizer, output.tokens, tiles=decode_tiles)
        for _ in range(warmup):
            decode()
        decode_seconds = median_seconds(decode, models.device, repeats=repeats)
    end_to_end = prior_seconds + (decode_seconds or 0.0)
    return {"batch_size": batch, "step_seconds": prior_seconds / int(output.steps_taken.max()),
            "prior_seconds": prior_seconds, "decode_seconds": decode_seconds, "seconds_per_image": end_to_end / batch,
            "images_per_second": batch / end_to_end, "mean_steps_taken": output.steps_taken.float().mean().item(),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(models.device) if cuda else None}


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def setting_line(result: dict[str, Any]) -> str:
    """``ffhq256 256x256 T=100 on <device> (cpu, 2 threads, float32, compile)``."""
    device = result["device"]
    threads = f", {device['threads']} threads" if device["type"] == "cpu" else ""
    knobs = "".join(f", {name}" for name in ("compile", "cuda_graphs", "early_stop") if result[name])
    return (f"{result['preset']} {result['image_size'][0]}x{result['image_size'][1]} T={result['steps']} on "
            f"{device['name']} ({device['type']}{threads}, {result['dtype']}{knobs})")


def summarize_times(result: dict[str, Any]) -> str:
    """One line: the setting, then per batch size the step, prior, decode and per-image times."""
    parts = []
    for entry in result["results"]:
        decode = "" if entry["decode_seconds"] is None else f" + decode {format_seconds(entry['decode_seconds'])}"
        memory = "" if entry["peak_memory_bytes"] is None else f", peak {entry['peak_memory_bytes'] / 2**30:.2f} GiB"
        parts.append(f"batch {entry['batch_size']}: {format_seconds(entry['step_seconds'])}/step, prior "
                     f"{format_seconds(entry['prior_seconds'])}{decode} = {format_seconds(entry['seconds_per_image'])}"
                     f"/image ({entry['images_per_second']:.3g} images/s){memory}")
    return f"{setting_line(result)}: " + "; ".join(parts)


__all__ = [
    "BenchmarkError", "BenchmarkModels", "ForwardTimer", "MemoryPeak", "PRESET_TOKENIZERS", "benchmark_models",
    "benchmark_sampling_options", "build_prior", "build_tokenizer", "compile_mode_for", "decoding_run", "device_facts",
    "load_average", "matmul_shapes", "median_seconds", "minimum_and_median", "peak_matmul_rate", "sampling_run",
    "summarize_times", "synchronize", "time_call", "time_forward", "time_sampling", "track_peak_memory",
]
