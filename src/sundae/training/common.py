"""Pieces shared by the tokenizer and prior training loops.

Exact resume is built in by making every random choice a pure function of ``(seed, step, rank)``:
the batch indices of a step, the noise of a step and the learning rate of a step are recomputed
from the step number, so a checkpoint only needs weights, optimizer moments, EMA and the step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from sundae.checkpoint import (  # noqa: F401 - the directory swap, re-exported for the training loops
    CheckpointError, atomic_path, read_json, recover_interrupted_checkpoint, replace_directory_atomically,
    staging_directory,
)
from sundae.config import ConfigBase, ConfigError
from sundae.distributed import DistributedContext, barrier, mean_across_ranks
from sundae.errors import InputError
from sundae.runtime import PRECISION_CHOICES

log = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class TrainingLoopConfig(ConfigBase):
    """The settings every training loop has: its run folder, seed, gradient clipping, how often it
    logs and checkpoints, where and in what precision it runs, and how it resumes."""

    output_dir: str
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    stop_after_steps: int | None = None  # end this process early (time-boxed jobs); resume later
    device: str | None = None
    precision: str = "auto"  # autocast dtype of the step: auto (bf16 where native), float32, bfloat16
    allow_changed_settings: bool = False  # resume even if settings that change the run differ from the checkpoint's


def check_loop_settings(config: Any, counts: tuple[str, ...]) -> None:
    """The checks every training config shares: a known precision, the ``counts`` fields >= 1 and a
    positive learning rate (a :class:`~sundae.config.ConfigError` naming the field otherwise)."""
    if config.precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {config.precision!r}")
    for name in counts:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")


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
        raise InputError("the training set is empty")
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
        raise InputError(f"unknown learning-rate schedule {schedule!r}; use constant, linear or cosine")
    return base * (final_ratio + (1.0 - final_ratio) * factor)


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


class ExponentialMovingAverage:
    """EMA of a model's parameters and buffers, kept in fp32 on the model's device.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (Tarvainen &
    Valpola 2017; TensorFlow's ``num_updates``): early on the average follows the fast-moving
    weights instead of remembering the random initialisation for ~1/(1 - decay) steps, which at
    decay 0.999 would be most of a short CPU run.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise InputError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.float(), weight)
            else:
                self.shadow[name].copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.updates = int(state["updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


class MetricsLogger:
    """Rank-0 metrics sink: a stdout line, ``metrics.jsonl``, and TensorBoard when installed.

    ``resume_step``: rows after it were written by the interrupted run past its last checkpoint;
    they are dropped, since the resumed run logs those steps again.
    """

    def __init__(self, directory: Path, *, enabled: bool, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            self._drop_rows_after(resume_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    log.info("tensorboard not installed: metrics go to stdout and %s only", self.path)
                else:
                    self.writer = SummaryWriter(str(directory / "tensorboard"))

    def _drop_rows_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

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


def is_due(done: int, every: int, last: int) -> bool:
    """Whether the step that brings the count to ``done`` is a multiple of ``every`` or the ``last`` one."""
    return done % every == 0 or done == last


class RunningMeans:
    """Each step's metrics, summed on the device between two log lines (no host sync until then)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.count += 1

    def pop(self, context: DistributedContext) -> dict[str, torch.Tensor]:
        """The means since the last call, averaged over ranks; the next window starts empty."""
        means = mean_across_ranks({name: total / self.count for name, total in self.sums.items()}, context)
        self.sums, self.count = {}, 0
        return means


class StepRate:
    """Steps and samples per second since a loop started, for its log lines."""

    def __init__(self, start_step: int, samples_per_step: int) -> None:
        self.start_step, self.samples_per_step = start_step, samples_per_step
        self.started = time.perf_counter()

    def steps_per_second(self, done: int) -> float:
        return (done - self.start_step) / (time.perf_counter() - self.started)

    def metrics(self, steps_per_second: float) -> dict[str, torch.Tensor]:
        return {"steps_per_second": torch.tensor(steps_per_second),
                "samples_per_second": torch.tensor(steps_per_second * self.samples_per_step)}


class Checkpointer:
    """A run's ``OUT/checkpoint`` (resumable) and ``OUT/<export_name>`` (the usable model) folders;
    subclasses write them (``save(step, ...)``, ``ensure_export(step, ...)``)."""

    export_name: str

    def __init__(self, output_dir: Path, config: Any) -> None:
        self.output_dir = output_dir
        self.config = config

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    @property
    def export_dir(self) -> Path:
        return self.output_dir / self.export_name

    def save(self, step: int, *parts: Any) -> None:
        raise NotImplementedError

    def ensure_export(self, step: int, *parts: Any) -> None:
        raise NotImplementedError

    def save_when_due(self, done: int, context: DistributedContext, *parts: Any, every: int, last: int) -> None:
        """Write the checkpoint of step ``done`` on the main rank when one is due; every rank waits for it."""
        if is_due(done, every, last):
            if context.is_main:
                self.save(done, *parts)
            barrier(context)

    def finish(self, step: int, context: DistributedContext, *parts: Any) -> None:
        """At the end of a run: rewrite a missing or stale export on the main rank; every rank waits."""
        if context.is_main:
            self.ensure_export(step, *parts)
        barrier(context)


@dataclass(frozen=True)
class TrainingResult:
    """Where a training command left its usable model, and how far it got."""

    export_dir: Path
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def summary(self, what: str) -> str:
        if self.finished:
            return f"{what} written to {self.export_dir} (step {self.step} of {self.total_steps})"
        return (f"stopped at step {self.step} of {self.total_steps} (--stop-after-steps): re-run the same command to "
                f"resume; {self.export_dir} holds the {what} of step {self.step}")


class RunLock:
    """An exclusive lock on a run folder (``OUT/.lock``): two training processes writing one folder's
    checkpoints would corrupt each other's resume. The OS drops the lock when the holder dies, so a
    killed run never blocks its own re-run."""

    def __init__(self, output_dir: Path) -> None:
        import fcntl

        output_dir.mkdir(parents=True, exist_ok=True)
        self.handle = open(output_dir / ".lock", "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise CheckpointError(f"another training process is writing {output_dir}; wait for it to finish (or stop "
                                  "it), or train into another --output-dir") from None

    def release(self) -> None:
        self.handle.close()


def run_locked(output_dir: Path, context: Any, body: Callable[[], R]) -> R:
    """Run ``body`` holding the run folder's :class:`RunLock` (taken by the main rank only)."""
    lock = RunLock(output_dir) if context.is_main else None
    try:
        return body()
    finally:
        if lock is not None:
            lock.release()


def remove_orphan_temporaries(output_dir: Path) -> int:
    """Delete the temporary files (``.NAME.XXXX.tmp`` of :func:`sundae.checkpoint.atomic_path`) and
    staging directories that a killed run left in its output folder; returns how many."""
    if not output_dir.is_dir():
        return 0
    orphans = [path for path in output_dir.rglob(".*.tmp") if path.is_file()]
    orphans += [path for path in output_dir.glob("*.staging") if path.is_dir()]
    for path in orphans:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if orphans:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(orphans), output_dir)
    return len(orphans)


def check_same_settings(saved: dict[str, Any], current: dict[str, Any], *, ignored: frozenset[str], where: Path,
                        allowed: bool) -> None:
    """Refuse to resume with training settings that change the run (schedule, data order, seed, ...).

    ``ignored`` fields do not change the trajectory (logging cadence, paths, devices); any other
    difference is an error naming the fields, unless ``allowed`` (``--allow-changed-settings``).
    """
    current = json.loads(json.dumps(current))  # tuples -> lists, as saved
    changed = [name for name in sorted(set(saved) | set(current))
               if name not in ignored and saved.get(name) != current.get(name)]
    if not changed:
        return
    described = ", ".join(f"{name} {saved.get(name)!r} -> {current.get(name)!r}" for name in changed)
    if allowed:
        log.warning("resuming %s with changed settings (allowed): %s", where, described)
        return
    raise CheckpointError(f"{where} was trained with other settings ({described}): resume with the same options, use "
                          "a new --output-dir, or pass --allow-changed-settings if the change is meant")


def exported_step(directory: Path) -> int | None:
    """The training step an exported model directory was written at; None when missing or unreadable."""
    try:
        step = read_json(directory / "config.json").get("step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) else None


def write_training_state(directory: Path, state: dict[str, Any]) -> None:
    with atomic_path(directory / TRAINING_STATE_FILE) as tmp:
        torch.save(state, tmp)


def read_training_state(directory: Path) -> dict[str, Any]:
    """The optimizer / EMA / step state, read with the bounded loader of :mod:`sundae.tokenizer.taming`
    (no code runs, no allocation beyond the file's size) and checked to be a state dict."""
    from sundae.tokenizer.taming import read_checkpoint_payload

    path = directory / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no {TRAINING_STATE_FILE}: it is not a resumable checkpoint")
    state = read_checkpoint_payload(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} is not a training state (a dict with a \"step\"); the checkpoint is damaged")
    return state
