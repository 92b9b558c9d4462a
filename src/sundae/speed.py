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
``benchmarks/speed.py``, built on the pieces here.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

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
    "BenchmarkError", "BenchmarkModels", "PRESET_TOKENIZERS", "benchmark_models", "benchmark_sampling_options",
    "build_prior", "build_tokenizer", "compile_mode_for", "decoding_run", "median_seconds", "sampling_run",
    "summarize_times", "time_call", "time_forward", "time_sampling",
]
