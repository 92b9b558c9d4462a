"""Pieces shared by the tokenizer and prior training loops.

Exact resume is built in by making every random choice a pure function of ``(seed, step, rank)``:
the batch indices of a step, the noise of a step and the learning rate of a step are recomputed
from the step number, so a checkpoint only needs weights, optimizer moments, EMA and the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from sundae.checkpoint import CheckpointError, load_training_state, save_training_state

log = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one (run seed, step, rank, stream) tuple (SplitMix64)."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + stream) & (2**64 - 1)
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    return value & (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, step, rank, stream))
    return generator


def batch_indices(step: int, *, dataset_size: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Indices of this rank's share of the global batch at ``step``.

    Samples are drawn epoch by epoch from a seeded permutation (no repeats within an epoch);
    the global batch of ``batch_size * world_size`` is split between ranks.
    """
    if dataset_size < 1:
        raise ValueError("the training set is empty")
    global_batch = batch_size * world_size
    start = step * global_batch + rank * batch_size
    indices = []
    permutation_epoch, permutation = -1, None
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, dataset_size)
        if epoch != permutation_epoch:
            generator = torch.Generator().manual_seed(step_seed(seed, epoch, 0, stream=7))
            permutation, permutation_epoch = torch.randperm(dataset_size, generator=generator), epoch
        indices.append(int(permutation[offset]))
    return indices


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the index lists of steps ``start_step, start_step + 1, ..., total_steps - 1``."""

    def __init__(self, *, dataset_size: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.total_steps, self.rank, self.world_size = start_step, total_steps, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield batch_indices(step, dataset_size=self.dataset_size, batch_size=self.batch_size, seed=self.seed,
                                rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def learning_rate(step: int, *, base: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                  final_ratio: float = 0.1) -> float:
    """Linear warm-up, then constant, linear or cosine decay to ``final_ratio * base``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant, linear or cosine")
    return base * (final_ratio + (1.0 - final_ratio) * factor)


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


class ExponentialMovingAverage:
    """EMA of a model's parameters and buffers, kept in fp32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


class MetricsLogger:
    """Rank-0 metrics sink: a stdout line, ``metrics.jsonl``, and TensorBoard when installed."""

    def __init__(self, directory: Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    log.info("tensorboard not installed: metrics go to stdout and %s only", self.path)
                else:
                    self.writer = SummaryWriter(str(directory / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float | torch.Tensor], *, prefix: str = "") -> dict[str, float]:
        if not self.enabled:
            return {}
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return values

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(*, total: int, initial: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def replace_directory_atomically(staging: Path, target: Path) -> None:
    """Swap a fully written ``staging`` directory into ``target`` so a crash never leaves half a checkpoint.

    The old checkpoint is moved aside first and deleted only once the new one is in place.
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def staging_directory(target: Path) -> Path:
    staging = target.with_name(target.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def recover_interrupted_checkpoint(target: Path) -> None:
    """If a crash hit between the two renames of :func:`replace_directory_atomically`, restore the old copy."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)
        log.warning("restored %s from an interrupted checkpoint swap", target)


def write_training_state(directory: Path, state: dict[str, Any]) -> None:
    save_training_state(directory / TRAINING_STATE_FILE, state)


def read_training_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no {TRAINING_STATE_FILE}: it is not a resumable checkpoint")
    return load_training_state(path)


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
