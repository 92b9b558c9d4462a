"""Training speed on this machine (``sundae bench --train``, ``benchmarks/speed.py --train``): one
optimizer step of the SUNDAE prior (paper §3.3: corrupt, unroll T steps, Eq. 6, backward through
every step, AdamW) or of the VQ-GAN tokenizer (§3.5, Eq. 7: the generator update with L1,
perceptual and adaptive-weighted GAN terms, then the patch-discriminator update).

The steps are the training loops' own (:func:`sundae.training.prior.accumulate_gradients` with
its DDP wrapper and label dropout, :func:`sundae.training.tokenizer.generator_step` and
``discriminator_step``) on random weights and random data: every multiply costs the same
whatever the numbers. Each batch size gets fresh models and optimizers, ``warmup`` untimed steps
(AdamW state, compilation, allocator growth) and ``repeats`` timed ones; times are the median
and the fastest step.

FLOPs are counted on one real step (forward and backward; FlopCounterMode, 2 per multiply-add,
CPU attention included) and, for the prior, compared with the peak matmul rate measured in the
same run (:func:`sundae.speed.peak_matmul_rate`, before and after the timed steps). The tokenizer
gets FLOP/s but no fraction: its convolutions are counted as direct convolution, which Winograd
kernels beat with fewer multiplies. :func:`ddp_scaling` runs the prior's step in 1 and in N CPU
processes over gloo and reports the data-parallel efficiency.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sundae.config import HOURGLASS_PRESETS, UNROLL_STEPS, VQGAN_PRESETS, HourglassConfig, VQGANConfig
from sundae.config import preset as named_preset
from sundae.denoiser import Hourglass, count_parameters
from sundae.denoiser.hourglass import describe
from sundae.distributed import DistributedContext, run_distributed
from sundae.models import model_directory
from sundae.runtime import resolve_device, resolve_training_precision
from sundae.speed import (
    PRESET_TOKENIZERS, BenchmarkError, device_facts, format_seconds, load_average, matmul_shapes,
    count_flops, minimum_and_median, peak_matmul_rate, time_call, track_peak_memory,
)
from sundae.tokenizer import VQGAN
from sundae.tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from sundae.tokenizer.losses import TokenizerLossConfig, build_perceptual_loss
from sundae.training.common import RunningMeans
from sundae.training.prior import PriorTrainingConfig, SundaeObjective, accumulate_gradients, parameter_groups
from sundae.training.tokenizer import TokenizerTrainingConfig, discriminator_step, generator_step

TRAINING_STEPS = ("prior", "tokenizer")
RANDOM_ROWS_PER_BATCH = 4  # random training rows per batch: batches change between steps, as with real data


class RandomTokens:
    """Seeded random token rows (and labels) with the two methods the prior's step reads from a dataset."""

    def __init__(self, config: HourglassConfig, rows: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, config.codebook_size, (rows, *config.latent_shape), generator=generator)
        self.labels = torch.randint(0, config.num_classes or 1, (rows,), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(tokens (B, h, w), labels (B,)), both int64, as :meth:`sundae.data.latents.TokenDataset.batch`."""
        rows = torch.as_tensor(indices)
        return self.tokens[rows], self.labels[rows]


# --- the models: a preset, or a model directory's own configs --------------------------------


def prior_setup(*, preset: str | None, model: str | None,
                unroll_steps: int | None) -> tuple[str, HourglassConfig, int]:
    """(name, prior config, unroll steps) of a prior preset or a model directory (a shipped model's
    name or a path); the unroll T is ``unroll_steps``, else Table 3's for the preset, else the
    model's recorded training setting, else 2."""
    if (preset is None) == (model is None):
        raise BenchmarkError("name either a prior preset or a model (a shipped model's name or a model directory)")
    if preset is not None:
        config, recorded = named_preset(preset, HOURGLASS_PRESETS), UNROLL_STEPS.get(preset)
        name = preset
    else:
        payload = Hourglass.read_config(model_directory(model) / "prior")
        config = Hourglass.config_from_payload(payload, model)
        recorded, name = payload.get("training", {}).get("unroll_steps"), f"{model} (model)"
    steps = unroll_steps if unroll_steps is not None else recorded if recorded is not None else 2
    if steps < 1:
        raise BenchmarkError(f"unroll_steps must be >= 1 (the paper uses 2 or 3), got {steps}")
    return name, config, steps


def tokenizer_setup(*, preset: str | None, model: str | None, tokenizer: str | None) -> tuple[str, VQGANConfig]:
    """(name, VQ-GAN config): the ``tokenizer`` preset, else a model directory's tokenizer, else the
    prior preset's own (:data:`sundae.speed.PRESET_TOKENIZERS`)."""
    if tokenizer is not None:
        return tokenizer, named_preset(tokenizer, VQGAN_PRESETS)
    if model is not None:
        directory = model_directory(model) / "tokenizer"
        return f"{model} (model)", VQGAN.config_from_payload(VQGAN.read_config(directory), directory)
    if preset not in PRESET_TOKENIZERS:
        raise BenchmarkError(f"preset {preset!r} has no tokenizer; name a tokenizer preset or one of "
                             f"{', '.join(sorted(PRESET_TOKENIZERS))}")
    return PRESET_TOKENIZERS[preset], named_preset(PRESET_TOKENIZERS[preset], VQGAN_PRESETS)


# --- one optimizer step ----------------------------------------------------------------------


def prior_step(config: HourglassConfig, *, batch_size: int, unroll_steps: int, context: DistributedContext,
               compute_dtype: torch.dtype, compile: bool) -> tuple[Callable[[int], None], Hourglass]:
    """``step(index)``: one optimizer step of the prior training loop (all micro-batches, clipping,
    AdamW), and the model it trains; built as :func:`sundae.training.prior._train` builds them."""
    training = PriorTrainingConfig(data="random tokens", output_dir="unused", model=config.to_dict(),
                                   batch_size=batch_size, unroll_steps=unroll_steps, compile=compile)
    torch.manual_seed(training.seed)
    model = Hourglass(config).to(context.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, training.weight_decay), lr=training.learning_rate,
                                  betas=training.betas, fused=context.device.type == "cuda")
    objective: nn.Module = SundaeObjective(model, unroll_steps)
    if compile:
        objective = torch.compile(objective)
    if context.enabled:
        objective = DistributedDataParallel(objective,
                                            device_ids=[context.local_rank] if context.device.type == "cuda" else None)
    dataset = RandomTokens(config, rows=RANDOM_ROWS_PER_BATCH * batch_size * context.world_size)
    running = RunningMeans()

    def step(index: int) -> None:
        accumulate_gradients(objective, dataset, index, config=training, model_config=config, context=context,
                             compute_dtype=compute_dtype, running=running)
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def tokenizer_step(config: VQGANConfig, *, batch_size: int, perceptual: str, device: torch.device,
                   compute_dtype: torch.dtype) -> tuple[Callable[[int], None], VQGAN]:
    """``step(index)``: one generator update (with the GAN term and its adaptive weight on) and one
    discriminator update, as :func:`sundae.training.tokenizer.prepare_run` builds them."""
    loss_config = TokenizerLossConfig(discriminator_start=0, perceptual=perceptual)
    training = TokenizerTrainingConfig(images="random images", output_dir="unused", model=config.to_dict(),
                                       loss=loss_config.to_dict(), discriminator={}, batch_size=batch_size)
    torch.manual_seed(training.seed)
    vqgan = VQGAN(config).to(device)
    discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=config.out_channels)).to(device)
    network = build_perceptual_loss(loss_config).to(device)
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=training.learning_rate, betas=training.betas,
                                          weight_decay=training.weight_decay, fused=device.type == "cuda")
                  for name, module in (("generator", vqgan), ("discriminator", discriminator))}
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch_size, config.in_channels, config.resolution, config.resolution, generator=generator,
                        device=device) * 2 - 1

    def step(index: int) -> None:
        output, _ = generator_step(vqgan, vqgan, images, discriminator=discriminator, perceptual=network,
                                   parameters=list(vqgan.parameters()), optimizer=optimizers["generator"],
                                   step=index, loss_config=loss_config, compute_dtype=compute_dtype,
                                   grad_clip=training.grad_clip)
        discriminator_step(discriminator, images, output.reconstruction, parameters=list(discriminator.parameters()),
                           optimizer=optimizers["discriminator"], step=index, loss_config=loss_config,
                           compute_dtype=compute_dtype, grad_clip=training.grad_clip)

    return step, vqgan


# --- timing ----------------------------------------------------------------------------------


def time_steps(step: Callable[[int], None], device: torch.device, *, warmup: int, repeats: int,
               with_flops: bool) -> dict[str, Any]:
    """Warm up, count one step's FLOPs (a real step) when asked, then time ``repeats`` steps."""
    for index in range(warmup):
        step(index)
    flops = count_flops(lambda: step(warmup)) if with_flops else None
    with track_peak_memory(device) as memory:
        seconds = [time_call(lambda: step(warmup + 1 + index), device)[1] for index in range(repeats)]
    return {"flops": flops, "seconds": seconds, "memory": memory}


def step_figures(timed: dict[str, Any], *, batch_size: int, world_size: int, tokens_per_sample: int) -> dict[str, Any]:
    """Times (median and min over the timed steps), throughput of all ranks, FLOP/s and memory."""
    seconds = minimum_and_median(timed["seconds"])
    samples = batch_size * world_size
    flops = timed["flops"]
    memory = timed["memory"]
    return {
        "batch_size": batch_size,
        "step_seconds": seconds["median"],
        "step_seconds_min": seconds["min"],
        "step_seconds_all_repeats": timed["seconds"],
        "samples_per_second": samples / seconds["median"],
        "samples_per_second_best": samples / seconds["min"],
        "tokens_per_second": samples * tokens_per_sample / seconds["median"],
        "flops_per_step": flops,
        "achieved_flops_per_second": None if flops is None else flops / seconds["median"],
        "peak_memory_bytes": memory.peak_bytes,
        "memory_increase_bytes": memory.increase_bytes,
        "peak_memory_reserved_bytes": memory.reserved_bytes,
        "memory_method": memory.method,
    }


def _check_settings(*, batch_sizes: tuple[int, ...], repeats: int, warmup: int) -> None:
    if not batch_sizes or min(batch_sizes) < 1:
        raise BenchmarkError(f"batch sizes must be >= 1, got {tuple(batch_sizes)}")
    if repeats < 1 or warmup < 1:
        raise BenchmarkError(f"need repeats >= 1 and warmup >= 1 (the first step creates AdamW's state), "
                             f"got {repeats}, {warmup}")


def _time_prior_batch(config: HourglassConfig, *, batch_size: int, unroll_steps: int, context: DistributedContext,
                      compute_dtype: torch.dtype, compile: bool, repeats: int, warmup: int) -> dict[str, Any]:
    """One batch size of :func:`time_prior_training`. Under DDP only the step is timed: a matmul
    measurement on one rank would only make the others wait at the next all-reduce."""
    step, _ = prior_step(config, batch_size=batch_size, unroll_steps=unroll_steps, context=context,
                         compute_dtype=compute_dtype, compile=compile)
    alone = not context.enabled
    shapes = matmul_shapes(batch_size * math.prod(config.latent_shape), config.dim)
    rates = [peak_matmul_rate(shapes, dtype=compute_dtype, device=context.device)] if alone else []
    timed = time_steps(step, context.device, warmup=warmup, repeats=repeats, with_flops=alone)
    result = step_figures(timed, batch_size=batch_size, world_size=context.world_size,
                          tokens_per_sample=math.prod(config.latent_shape))
    if alone:
        rates.append(peak_matmul_rate(shapes, dtype=compute_dtype, device=context.device))
        peak = max(rates)
        result.update(matmul_flops_per_second=peak, matmul_flops_per_second_all_measurements=rates,
                      matmul_shapes=[[rows, dim, 4 * dim] for rows, dim in shapes],
                      fraction_of_matmul_peak=result["achieved_flops_per_second"] / peak,
                      fraction_of_matmul_peak_best=timed["flops"] / result["step_seconds_min"] / peak)
    return result


def time_prior_training(*, preset: str | None = None, model: str | None = None, batch_sizes: tuple[int, ...] = (1,),
                        precision: str = "float32", compile: bool = False, repeats: int = 3, warmup: int = 2,
                        device: str | torch.device | None = None, unroll_steps: int | None = None,
                        context: DistributedContext | None = None) -> dict[str, Any]:
    """Time optimizer steps of a prior preset (or a model directory's prior) per batch size.

    Args:
        preset / model: a :data:`~sundae.config.HOURGLASS_PRESETS` name, or a shipped model's name or
            model directory (its prior's config); exactly one.
        batch_sizes: per-process batch sizes, one result each.
        precision: the autocast dtype, ``"float32"``, ``"bfloat16"`` or ``"auto"`` (bf16 where native);
            master weights, AdamW state and losses stay fp32, as in training.
        compile: ``torch.compile`` the objective (all T unroll steps), as ``sundae train --compile``.
        repeats, warmup: timed and untimed steps (warmup >= 1: the first creates AdamW's state).
        unroll_steps: T; None: Table 3's for the preset, else the model's recorded setting, else 2.
        context: a DDP rank (:func:`ddp_scaling`); None: this process alone on ``device``.

    Returns a JSON-able dict: settings, device facts, one entry per batch size in ``results``
    (``step_seconds`` and ``_min``, ``samples_per_second``, ``tokens_per_second``, ``flops_per_step``,
    ``fraction_of_matmul_peak``, ``peak_memory_bytes``, ...) and a one-line ``summary``.
    """
    _check_settings(batch_sizes=batch_sizes, repeats=repeats, warmup=warmup)
    name, config, unroll = prior_setup(preset=preset, model=model, unroll_steps=unroll_steps)
    if context is None:
        context = DistributedContext(rank=0, local_rank=0, world_size=1, device=resolve_device(device))
    compute_dtype = resolve_training_precision(precision, context.device)
    load_before = load_average()
    results = [_time_prior_batch(config, batch_size=batch, unroll_steps=unroll, context=context,
                                 compute_dtype=compute_dtype, compile=compile, repeats=repeats, warmup=warmup)
               for batch in batch_sizes]
    result = _settings("prior", name, compute_dtype=compute_dtype, compile=compile, repeats=repeats, warmup=warmup,
                       context=context, load_before=load_before, results=results)
    result.update(unroll_steps=unroll, parameters=describe(config)["parameters"],
                  latent_shape=list(config.latent_shape), codebook_size=config.codebook_size)
    result["summary"] = summarize_training(result)
    return result


def time_tokenizer_training(*, preset: str | None = None, model: str | None = None, tokenizer: str | None = None,
                            batch_sizes: tuple[int, ...] = (1,), precision: str = "float32", repeats: int = 3,
                            warmup: int = 2, device: str | torch.device | None = None,
                            perceptual: str = "auto") -> dict[str, Any]:
    """Time tokenizer training steps (generator + discriminator update, GAN term on) per batch size.

    The VQ-GAN is the ``tokenizer`` preset, else ``model``'s tokenizer, else the prior ``preset``'s
    (:data:`sundae.speed.PRESET_TOKENIZERS`). ``perceptual``: the perceptual features of Eq. 7
    (:class:`~sundae.tokenizer.losses.TokenizerLossConfig`; ``"none"`` drops the term, as the
    Fashion-MNIST recipe does). Other settings and the result: :func:`time_prior_training`, without
    the matmul fraction (see the module docstring).
    """
    _check_settings(batch_sizes=batch_sizes, repeats=repeats, warmup=warmup)
    name, config = tokenizer_setup(preset=preset, model=model, tokenizer=tokenizer)
    context = DistributedContext(rank=0, local_rank=0, world_size=1, device=resolve_device(device))
    compute_dtype = resolve_training_precision(precision, context.device)
    load_before = load_average()
    results = []
    for batch in batch_sizes:
        step, vqgan = tokenizer_step(config, batch_size=batch, perceptual=perceptual, device=context.device,
                                     compute_dtype=compute_dtype)
        timed = time_steps(step, context.device, warmup=warmup, repeats=repeats, with_flops=True)
        results.append(step_figures(timed, batch_size=batch, world_size=1,
                                    tokens_per_sample=(config.resolution // config.downsample_factor) ** 2))
    result = _settings("tokenizer", name, compute_dtype=compute_dtype, compile=False, repeats=repeats, warmup=warmup,
                       context=context, load_before=load_before, results=results)
    result.update(perceptual=perceptual, parameters=count_parameters(vqgan), image_size=config.resolution)
    result["summary"] = summarize_training(result)
    return result


def _settings(kind: str, name: str, *, compute_dtype: torch.dtype, compile: bool, repeats: int, warmup: int,
              context: DistributedContext, load_before: list[float] | None,
              results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"training_step": kind, "preset": name, "dtype": str(compute_dtype).removeprefix("torch."),
            "compile": compile, "repeats": repeats, "warmup": warmup, "world_size": context.world_size,
            "device": device_facts(context.device), "torch_version": torch.__version__,
            "load_average_before": load_before, "load_average_after": load_average(), "results": results}


def training_setting_line(result: dict[str, Any]) -> str:
    """``prior training step, ffhq256 T=3 on <device> x 2 ranks (cpu, 1 threads, float32, compile)``."""
    device = result["device"]
    threads = f", {device['threads']} threads" if device["type"] == "cpu" else ""
    ranks = f" x {result['world_size']} ranks" if result["world_size"] > 1 else ""
    unroll = f" T={result['unroll_steps']}" if "unroll_steps" in result else ""
    return (f"{result['training_step']} training step, {result['preset']}{unroll} on {device['name']}{ranks} "
            f"({device['type']}{threads}, {result['dtype']}{', compile' if result['compile'] else ''})")


def summarize_training(result: dict[str, Any]) -> str:
    """One line: the setting, then per batch size the step time, throughput, FLOP/s and memory."""
    parts = []
    for entry in result["results"]:
        rate = entry["achieved_flops_per_second"]
        flops = "" if rate is None else f", {rate / 1e9:.4g} GFLOP/s"
        fraction = entry.get("fraction_of_matmul_peak")
        peak = "" if fraction is None else (
            f" = {fraction:.2f} of the peak matmul {entry['matmul_flops_per_second'] / 1e9:.4g} GFLOP/s")
        memory = "" if entry["peak_memory_bytes"] is None else f", peak {entry['peak_memory_bytes'] / 2**30:.2f} GiB"
        parts.append(f"batch {entry['batch_size']}: {format_seconds(entry['step_seconds'])}/step (min "
                     f"{format_seconds(entry['step_seconds_min'])}), {entry['samples_per_second']:.3g} samples/s, "
                     f"{entry['tokens_per_second']:.4g} tokens/s{flops}{peak}{memory}")
    return f"{training_setting_line(result)}: " + "; ".join(parts)


# --- data-parallel scaling -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, threads: int, output: str, settings: dict[str, Any]) -> None:
    """One process of :func:`ddp_scaling`: join the gloo group as ``rank``, time, rank 0 writes the result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = run_distributed(lambda context: time_prior_training(context=context, **settings), "cpu")
    if rank == 0:
        Path(output).write_text(json.dumps(result))


def _run_ranks(world_size: int, *, threads: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's :func:`time_prior_training` result of ``world_size`` fresh processes."""
    with tempfile.TemporaryDirectory() as directory:
        output = str(Path(directory) / "result.json")
        torch.multiprocessing.start_processes(_rank_worker, args=(world_size, _free_port(), threads, output, settings),
                                              nprocs=world_size, start_method="spawn")
        return json.loads(Path(output).read_text())


def ddp_scaling(*, ranks: int = 2, threads_per_rank: int | None = None, **settings: Any) -> dict[str, Any]:
    """Data-parallel efficiency of the prior's training step on CPU processes over gloo: the
    throughput of ``ranks`` processes ÷ (``ranks`` × that of one), per batch size (per process).

    Both runs are fresh processes with ``threads_per_rank`` threads each (None: the CPU's cores
    divided among the ranks), so they differ only in the gradient all-reduce and in sharing the
    machine. ``settings`` are :func:`time_prior_training`'s (no ``device``: gloo runs on the CPU).
    """
    if ranks < 2:
        raise BenchmarkError(f"DDP scaling needs ranks >= 2, got {ranks}")
    if "device" in settings or "context" in settings:
        raise BenchmarkError("DDP scaling runs on CPU processes (gloo); it takes no device or context")
    threads = threads_per_rank if threads_per_rank is not None else max(1, (os.cpu_count() or 1) // ranks)
    single, parallel = (_run_ranks(count, threads=threads, settings=settings) for count in (1, ranks))
    efficiency = [many["samples_per_second"] / (ranks * one["samples_per_second"])
                  for one, many in zip(single["results"], parallel["results"])]
    return {"training_step": "prior", "preset": parallel["preset"], "device": parallel["device"], "ranks": ranks,
            "threads_per_rank": threads, "single": single, "parallel": parallel,
            "efficiency": efficiency,
            "summary": f"{training_setting_line(parallel)}: DDP efficiency " + ", ".join(
                f"batch {entry['batch_size']}: {value:.2f}" for entry, value in zip(parallel["results"], efficiency))}


__all__ = [
    "RandomTokens", "TRAINING_STEPS", "ddp_scaling", "prior_setup", "prior_step",
    "summarize_training", "time_prior_training", "time_tokenizer_training", "tokenizer_setup", "tokenizer_step",
    "training_setting_line",
]
