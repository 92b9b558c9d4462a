"""Training loop of the SUNDAE prior (paper §3.3, Table 3), and of VAR's next-scale prior on the same
machinery (``family="var"``, :mod:`sundae.var.training`): orchestration only.

The step math lives in :func:`sundae.sundae.sundae_loss` (VAR's in :func:`sundae.var.next_scale_loss`);
this module reads a token dataset
(latents from ``sundae encode`` or grey pixels as tokens, §4.2), builds the hourglass from its
config, and runs AdamW with warm-up and decay, gradient accumulation and clipping, optional EMA,
bf16 autocast on CUDA, DDP under ``torchrun``, validation, sample grids, metrics and atomic,
exactly resumable checkpoints.

Output directory layout::

    OUT/checkpoint/   config.json, model.safetensors, training_state.pt   (resumable, latest)
    OUT/model/        model_index.json, prior/, [tokenizer/,] scheduler/  (the usable model: sundae.pipeline;
                                                                          EMA weights if on)
    OUT/samples/      step_XXXXXXX.png sample grids
    OUT/metrics.jsonl
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sundae.checkpoint import WEIGHTS_NAME, CheckpointError, load_weights, read_json
from sundae.config import ConfigBase, ConfigError, HourglassConfig, KnobOptions, SamplingOptions
from sundae.data.images import DatasetError
from sundae.data.latents import same_codes
from sundae.denoiser import Hourglass
from sundae.distributed import DistributedContext, mean_across_ranks, run_distributed
from sundae.models import model_directory
from sundae.pipeline import MODEL_INDEX_NAME, PIPELINE_KIND, PRIOR_SUBDIR, write_model_directory
from sundae.runtime import autocast, resolve_training_precision
from sundae.sundae import sundae_loss
from sundae.training.common import (
    Checkpointer, ExponentialMovingAverage, MetricsLogger, RunningMeans, StepRate, TrainingLoopConfig,
    TrainingResult, batch_indices, check_loop_settings, check_same_settings, exported_step, is_due, learning_rate,
    progress_bar, read_training_state, recover_interrupted_checkpoint, remove_orphan_temporaries, run_locked,
    replace_directory_atomically, set_learning_rate, staging_directory, step_generator, step_seed,
    write_training_state,
)
from sundae.training.throughput import Throughput

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PriorTrainingConfig(TrainingLoopConfig):
    data: str  # a latent dataset directory (sundae encode) or a pixel-token .npz (sundae.data.mnist)
    model: dict[str, Any]  # HourglassConfig fields; codebook_size / latent_shape / num_classes come from the data
    steps: int = 10_000
    batch_size: int = 32  # per process, per micro-batch
    gradient_accumulation: int = 1
    learning_rate: float = 3e-4
    warmup_steps: int = 500
    schedule: str = "cosine"
    final_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    unroll_steps: int = 2
    class_conditional: bool = True  # use the dataset's labels when it has them
    label_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    ema_decay: float | None = None
    eval_every: int = 500
    eval_batches: int = 8
    sample_every: int = 1000
    sample_steps: int = 50
    compile: bool = False
    init_from: str | None = None  # a shipped model's name or a model directory whose prior the run starts from
    flips: bool = True  # train (and validate) on the latent dataset's horizontally flipped rows too
    family: str = "sundae"  # "sundae" (the hourglass denoiser) or "var" (sundae.var's next-scale transformer)

    def validate(self) -> None:
        if self.family not in PRIOR_FAMILIES:
            raise ConfigError(f"family must be one of {', '.join(PRIOR_FAMILIES)}, got {self.family!r}")
        check_loop_settings(self, ("steps", "batch_size", "gradient_accumulation", "log_every", "eval_every",
                                   "sample_every", "checkpoint_every", "eval_batches", "sample_steps"))
        if self.unroll_steps < 1:
            raise ConfigError(f"unroll_steps must be >= 1 (the paper uses 2 or 3), got {self.unroll_steps}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


PRIOR_FAMILIES = ("sundae", "var")


class SundaeObjective(nn.Module):
    """Wraps the denoiser so that DDP sees one forward (all T unroll steps) per backward."""

    def __init__(self, denoiser: nn.Module, unroll_steps: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.unroll_steps = unroll_steps

    def forward(self, tokens: Tensor, class_labels: Tensor | None, generator: torch.Generator) -> tuple[Tensor, dict]:
        return sundae_loss(self.denoiser, tokens, unroll_steps=self.unroll_steps, class_labels=class_labels,
                           generator=generator)


def open_token_dataset(path: str | Path, split: str, *, flips: bool = True):
    """A latent dataset directory (without its flipped rows when ``flips`` is False), or a pixel-token
    ``.npz`` (grey levels as tokens, v = 256; it has no flipped rows)."""
    path = Path(path)
    if path.suffix == ".npz":
        from sundae.data.mnist import PixelTokenDataset

        return PixelTokenDataset(path, split=split)
    from sundae.data.latents import LatentDataset

    return LatentDataset(path, split=split, flips=flips)


def data_classes(dataset, config: PriorTrainingConfig) -> int | None:
    """The number of classes a prior of ``dataset`` is conditioned on (None: unconditional)."""
    conditional = config.class_conditional and dataset.num_classes is not None and dataset.num_classes > 1
    return dataset.num_classes if conditional else None


class SundaeFamily:
    """What the prior loop needs of a paradigm, for SUNDAE's hourglass denoiser (the other one is VAR's,
    :class:`sundae.var.training.NextScaleFamily`): the network and its config, the objective, a sample of
    tokens for the grids, the scheduler and kind of the exported model directory."""

    name = "sundae"  # PriorTrainingConfig.family
    kind = PIPELINE_KIND
    model_class: type[nn.Module] = Hourglass
    config_class: type[ConfigBase] = HourglassConfig

    def __init__(self, config: PriorTrainingConfig, dataset, device: torch.device) -> None:
        self.config, self.dataset, self.device = config, dataset, device

    def model_config(self) -> HourglassConfig:
        """The hourglass config: the user's fields plus the vocabulary, grid and classes of the data."""
        fields = {**self.config.model, "codebook_size": self.dataset.codebook_size,
                  "latent_shape": tuple(self.dataset.grid_shape), "num_classes": data_classes(self.dataset, self.config)}
        return HourglassConfig.from_dict(fields)

    def objective(self, model: nn.Module) -> nn.Module:
        """``objective(tokens, labels, generator) -> (loss, metrics)`` of ``model``."""
        return SundaeObjective(model, self.config.unroll_steps)

    def sample(self, model: nn.Module, labels: Tensor | None, seeds: Tensor) -> Tensor:
        from sundae.sampler import sample

        return sample(model, options=SamplingOptions(steps=self.config.sample_steps), num_samples=len(seeds),
                      grid_shape=model.config.latent_shape, class_labels=labels, seeds=seeds).tokens

    def scheduler(self) -> KnobOptions:
        return SamplingOptions()

    def positions(self, model_config: Any) -> int:
        """Token positions per sample (for the throughput's matmul rows)."""
        return math.prod(model_config.latent_shape)




def data_identity(dataset) -> dict[str, Any]:
    return {"tokenizer": getattr(dataset, "tokenizer", None), "codebook_size": dataset.codebook_size,
            "grid_shape": list(dataset.grid_shape), "class_names": list(dataset.class_names)}


def check_same_data(saved: dict[str, Any], current: dict[str, Any], where: Path,
                    remedy: str = "use a new --output-dir or the latents of the original tokenizer") -> None:
    if saved["codebook_size"] == current["codebook_size"] and same_codes(saved.get("tokenizer"),
                                                                         current.get("tokenizer")):
        return
    saved_sha, current_sha = ((record.get("tokenizer") or {}).get("sha256") for record in (saved, current))
    raise CheckpointError(
        f"the checkpoint in {where} was trained on tokens of another tokenizer "
        f"(codebook {saved['codebook_size']}, tokenizer sha256 {saved_sha}) but the data has "
        f"codebook {current['codebook_size']}, tokenizer sha256 {current_sha}; {remedy}"
    )


def drop_labels(labels: Tensor | None, null_class: int | None, probability: float,
                generator: torch.Generator) -> Tensor | None:
    if labels is None or probability == 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.dim() >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batch(dataset, indices: list[int], device: torch.device, use_labels: bool) -> tuple[Tensor, Tensor | None]:
    tokens, labels = dataset.batch(indices)
    tokens = tokens.to(device, non_blocking=True)
    return tokens, (labels.to(device, non_blocking=True) if use_labels else None)


@torch.no_grad()
def validation_loss(model: nn.Module, dataset, config: PriorTrainingConfig, context: DistributedContext,
                    compute_dtype: torch.dtype = torch.float32, family: SundaeFamily | None = None) -> dict[str, Tensor]:
    """Mean loss (SUNDAE's, or the ``family``'s) over a fixed, seeded set of validation batches (same
    batches every time)."""
    objective = (family or SundaeFamily(config, dataset, context.device)).objective(model)
    model.eval()
    totals: dict[str, Tensor] = {}
    use_labels = model.config.num_classes is not None
    for batch in range(config.eval_batches):
        indices = batch_indices(batch, dataset_size=len(dataset), batch_size=config.batch_size, seed=config.seed + 1,
                                rank=context.rank, world_size=context.world_size)
        tokens, labels = _batch(dataset, indices, context.device, use_labels)
        generator = step_generator(config.seed, batch, context.rank, stream=11, device=context.device)
        with autocast(context.device, compute_dtype):
            loss, metrics = objective(tokens, labels, generator)
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + value.float() / config.eval_batches
    model.train()
    return mean_across_ranks(totals, context)


# Settings that do not change what a run computes: a resume may change them freely.
RESUMABLE_CHANGES = frozenset({"data", "output_dir", "log_every", "eval_every", "eval_batches", "sample_every",
                               "sample_steps", "checkpoint_every", "stop_after_steps", "device", "compile",
                               "allow_changed_settings"})


class PriorCheckpointer(Checkpointer):
    """Writes OUT/checkpoint (resumable) and OUT/model (usable prior + its tokenizer) atomically."""

    export_name = "model"

    def __init__(self, output_dir: Path, config: PriorTrainingConfig, dataset, family: SundaeFamily) -> None:
        super().__init__(output_dir, config)
        self.identity = data_identity(dataset)
        self.tokenizer_dir = _tokenizer_directory(dataset)
        self.family = family

    def extra(self, step: int) -> dict[str, Any]:
        return {"data": self.identity, "training": self.config.to_dict(), "step": step}

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             ema: ExponentialMovingAverage | None) -> None:
        staging = staging_directory(self.checkpoint_dir)
        model.save_pretrained(staging, extra=self.extra(step))
        write_training_state(staging, {"step": step, "optimizer": optimizer.state_dict(),
                                       "ema": None if ema is None else ema.state_dict()})
        replace_directory_atomically(staging, self.checkpoint_dir)
        self.export(step, model, ema)

    def export(self, step: int, model: nn.Module, ema: ExponentialMovingAverage | None) -> None:
        """The usable model directory: the prior (EMA weights when kept), a copy of its tokenizer's files,
        and the library's sampling defaults as its scheduler (staged and swapped in whole)."""
        exported = model
        if ema is not None:
            exported = self.family.model_class(model.config)
            ema.copy_to(exported)
        write_model_directory(self.export_dir, prior=exported, tokenizer=self.tokenizer_dir,
                              scheduler=self.family.scheduler(), prior_extra=self.extra(step), kind=self.family.kind)

    def ensure_export(self, step: int, model: nn.Module, ema: ExponentialMovingAverage | None) -> None:
        """Re-export when the export is missing or older than the checkpoint (a kill during its swap)."""
        if exported_step(self.export_dir / PRIOR_SUBDIR) != step:
            log.info("exporting the prior of step %d to %s (it was missing or stale)", step, self.export_dir)
            self.export(step, model, ema)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                ema: ExponentialMovingAverage | None) -> int:
        """Load the latest checkpoint if there is one; return the step to continue from (0 if none)."""
        recover_interrupted_checkpoint(self.checkpoint_dir)
        recover_interrupted_checkpoint(self.export_dir)
        if not self.checkpoint_dir.exists():
            return 0
        saved = read_json(self.checkpoint_dir / "config.json")
        if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict) or "config" not in saved:
            raise CheckpointError(f"{self.checkpoint_dir / 'config.json'} is not a prior checkpoint's config (it needs "
                                  "\"config\" and \"data\" objects); use a new --output-dir")
        check_same_data(saved["data"], self.identity, self.checkpoint_dir)
        if self.family.config_class.from_dict(saved["config"]) != model.config:
            raise CheckpointError(
                f"{self.checkpoint_dir} holds a model of another configuration than the one requested; "
                "use a new --output-dir or the same model options"
            )
        # runs from before the VAR family were SUNDAE runs
        check_same_settings({"family": "sundae", **saved.get("training", {})}, self.config.to_dict(),
                            ignored=RESUMABLE_CHANGES,
                            where=self.checkpoint_dir, allowed=self.config.allow_changed_settings)
        load_weights(model, self.checkpoint_dir / "model.safetensors")
        state = read_training_state(self.checkpoint_dir)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"{self.checkpoint_dir} was trained without EMA; resume without --ema-decay")
            ema.load_state_dict(state["ema"])
        log.info("resumed from %s at step %d", self.checkpoint_dir, state["step"])
        return int(state["step"])


def start_from(model: nn.Module, name_or_path: str, identity: dict[str, Any], family: SundaeFamily) -> None:
    """Initialise ``model`` from the prior of a shipped model (by name), a model directory or a prior's own
    folder (e.g. a run's ``checkpoint/``) of the same configuration, trained on the same tokenizer's tokens:
    a longer schedule after a finished run, or fine-tuning a shipped model on new images of its domain.
    Only the weights are taken; the optimizer, schedule and EMA start afresh (a resumable run continues
    with a plain resume)."""
    directory = model_directory(name_or_path)
    prior_dir = directory / PRIOR_SUBDIR if (directory / MODEL_INDEX_NAME).is_file() else directory
    payload = family.model_class.read_config(prior_dir)
    if family.config_class.from_dict(payload["config"]) != model.config:
        raise ConfigError(f"--init-from {directory} holds a prior of another configuration than the one requested "
                          f"({payload['config']}); use the same --preset and model options")
    saved = payload.get("data")
    if not isinstance(saved, dict) or "codebook_size" not in saved:
        raise CheckpointError(f"--init-from {directory}: {prior_dir / 'config.json'} does not say which tokens the "
                              "prior was trained on (no \"data\" object)")
    check_same_data(saved, identity, prior_dir, remedy=f"encode the images with the tokenizer of {directory} "
                    "(`sundae encode IMAGES --tokenizer ...`) or train without --init-from")
    load_weights(model, prior_dir / WEIGHTS_NAME)
    log.info("starting from the prior weights of %s", prior_dir)


def _tokenizer_directory(dataset) -> Path | None:
    identity = getattr(dataset, "tokenizer", None)
    if not identity or not identity.get("path"):
        return None
    path = Path(identity["path"])
    return path if (path / "model.safetensors").is_file() else None


def save_sample_grid(model: nn.Module, dataset, config: PriorTrainingConfig, step: int, device: torch.device, *,
                     name: str, family: SundaeFamily) -> Path:
    """Class-conditional grid of ``model`` (raw or EMA weights) at ``OUT/samples/step_XXXXXXX_<name>.png``."""
    from sundae.pipeline import decode_tokens_to_images, load_decoder_for
    from sundae.data.images import save_image_grid

    num_classes = model.config.num_classes
    count = 4 * num_classes if num_classes is not None and num_classes <= 16 else 16
    labels = None if num_classes is None else torch.arange(count, device=device) % num_classes
    model.eval()
    tokens = family.sample(model, labels, torch.arange(count) + 1000 * config.seed)
    model.train()
    decoder = load_decoder_for(dataset, device)
    images = decode_tokens_to_images(tokens, decoder)
    path = Path(config.output_dir) / "samples" / f"step_{step:07d}_{name}.png"
    save_image_grid(images, path, nrow=num_classes if num_classes is not None and num_classes <= 16 else None)
    return path


def train_prior(config: PriorTrainingConfig, family: type[SundaeFamily] = SundaeFamily) -> TrainingResult:
    """Train (or resume) a prior of ``family`` (SUNDAE's; VAR's is :func:`sundae.var.training.train_var`);
    returns the exported model directory."""
    if config.family != family.name:
        raise ConfigError(f"the training config says family {config.family!r} but the loop was given {family.name!r}")
    return run_distributed(lambda context: run_locked(Path(config.output_dir), context,
                                                      lambda: _train(config, context, family)), config.device)


def _open_splits(config: PriorTrainingConfig) -> tuple[Any, Any]:
    """The train and validation token datasets, refused before any step runs when one is empty."""
    dataset = open_token_dataset(config.data, "train", flips=config.flips)
    validation = open_token_dataset(config.data, "validation", flips=config.flips)
    for split, rows in (("train", dataset), ("validation", validation)):
        if len(rows) == 0:
            raise DatasetError(f"{config.data} has no {split} rows; encode more images or a larger "
                               "--validation-fraction (sundae encode)")
    return dataset, validation


def _log_run(model: nn.Module, config: PriorTrainingConfig, dataset, validation, context: DistributedContext,
             compute_dtype: torch.dtype, ema: ExponentialMovingAverage | None) -> None:
    model_config = model.config
    log.info("prior: %s parameters, %s, data %s (%d train / %d validation, grid %s, v=%d, classes=%s)",
             f"{sum(p.numel() for p in model.parameters()):,}", model_config.to_dict(), config.data, len(dataset),
             len(validation), tuple(dataset.grid_shape), dataset.codebook_size, model_config.num_classes)
    log.info("settings: %d steps x batch %d (x%d accumulation), lr %g (%s, %d warm-up), T=%d, precision %s (%s), "
             "EMA %s", config.steps, config.batch_size * context.world_size, config.gradient_accumulation,
             config.learning_rate, config.schedule, config.warmup_steps, config.unroll_steps, config.precision,
             str(compute_dtype).removeprefix("torch."), "off" if ema is None else f"decay {ema.decay}")


def accumulate_gradients(objective: nn.Module, dataset, step: int, *, config: PriorTrainingConfig,
                         model_config: HourglassConfig, context: DistributedContext, compute_dtype: torch.dtype,
                         running: RunningMeans) -> None:
    """The backward passes of one optimizer step: its micro-batches, each with the batch, unroll noise,
    label dropout and dropout masks that (seed, micro-step, rank) fix, so a resumed run repeats them;
    DDP all-reduces the gradients on the last micro-batch only."""
    use_labels = model_config.num_classes is not None
    for micro in range(config.gradient_accumulation):
        micro_step = step * config.gradient_accumulation + micro
        indices = batch_indices(micro_step, dataset_size=len(dataset), batch_size=config.batch_size,
                                seed=config.seed, rank=context.rank, world_size=context.world_size)
        tokens, labels = _batch(dataset, indices, context.device, use_labels)
        generator = step_generator(config.seed, micro_step, context.rank, stream=1, device=context.device)
        torch.manual_seed(step_seed(config.seed, micro_step, context.rank, stream=3))  # dropout masks
        labels = drop_labels(labels, model_config.null_class, config.label_dropout, generator)
        is_last = micro == config.gradient_accumulation - 1
        sync = objective.no_sync() if (context.enabled and not is_last) else contextlib.nullcontext()
        with sync, autocast(context.device, compute_dtype):
            loss, metrics = objective(tokens, labels, generator)
            (loss / config.gradient_accumulation).backward()
        running.add({"loss": loss.detach(), **metrics})


def _evaluate_and_sample(done: int, model: nn.Module, ema: ExponentialMovingAverage | None, dataset, validation,
                         config: PriorTrainingConfig, context: DistributedContext, compute_dtype: torch.dtype,
                         metrics_logger: MetricsLogger, family: SundaeFamily) -> None:
    """Validation loss and sample grids when due, of the raw weights and of the EMA ones (what ships)."""
    evaluating = is_due(done, config.eval_every, config.steps)
    sampling = context.is_main and is_due(done, config.sample_every, config.steps)
    # one copy of the EMA weights per step that needs it
    ema_model = _ema_model(model, ema, family) if ema is not None and (evaluating or sampling) else None
    if evaluating:
        metrics_logger.log(done, validation_loss(model, validation, config, context, compute_dtype, family),
                           prefix="validation/")
        if ema_model is not None:
            metrics_logger.log(done, validation_loss(ema_model, validation, config, context, compute_dtype, family),
                               prefix="validation_ema/")
    if sampling:
        for name, weights in (("raw", model), ("ema", ema_model)):
            if weights is not None:
                path = save_sample_grid(weights, dataset, config, done, context.device, name=name, family=family)
                log.info("samples at step %d (%s weights): %s", done, name, path)


def _train(config: PriorTrainingConfig, context: DistributedContext, family_class: type[SundaeFamily]) -> TrainingResult:
    output_dir = Path(config.output_dir)
    dataset, validation = _open_splits(config)
    family = family_class(config, dataset, context.device)
    model_config = family.model_config()
    torch.manual_seed(config.seed)
    model = family.model_class(model_config).to(context.device)
    if config.init_from is not None:  # before the EMA copies the weights; a checkpoint's restore overrides both
        start_from(model, config.init_from, data_identity(dataset), family)
    compute_dtype = resolve_training_precision(config.precision, context.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=config.betas, fused=context.device.type == "cuda")
    ema = ExponentialMovingAverage(model, config.ema_decay) if config.ema_decay is not None else None
    checkpointer = PriorCheckpointer(output_dir, config, dataset, family)
    if context.is_main:
        remove_orphan_temporaries(output_dir)
    start_step = checkpointer.restore(model, optimizer, ema)

    objective: nn.Module = family.objective(model)
    if config.compile:
        objective = torch.compile(objective)
    if context.enabled:
        objective = DistributedDataParallel(objective, device_ids=[context.local_rank] if context.device.type == "cuda" else None)

    metrics_logger = MetricsLogger(output_dir, enabled=context.is_main, resume_step=start_step)
    if context.is_main:
        _log_run(model, config, dataset, validation, context, compute_dtype, ema)
    end_step = config.steps if config.stop_after_steps is None else min(config.steps, start_step + config.stop_after_steps)
    bar = progress_bar(total=config.steps, initial=start_step, enabled=context.is_main, description="train prior")
    running = RunningMeans()
    throughput = Throughput(context.device, compute_dtype, rows=config.batch_size * family.positions(model_config),
                            dim=model_config.dim, enabled=context.is_main)
    rate = StepRate(start_step, config.batch_size * config.gradient_accumulation * context.world_size)
    for step in range(start_step, end_step):
        set_learning_rate(optimizer, learning_rate(step, base=config.learning_rate, warmup_steps=config.warmup_steps,
                                                   total_steps=config.steps, schedule=config.schedule,
                                                   final_ratio=config.final_learning_rate_ratio))
        throughput.run_step(lambda: accumulate_gradients(objective, dataset, step, config=config,
                                                         model_config=model_config, context=context,
                                                         compute_dtype=compute_dtype, running=running))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        bar.update(1)
        done = step + 1
        if is_due(done, config.log_every, end_step):
            steps_per_second = rate.steps_per_second(done)
            averaged = {**running.pop(context), "grad_norm": grad_norm,
                        "lr": torch.tensor(optimizer.param_groups[0]["lr"]), **rate.metrics(steps_per_second),
                        **throughput.fraction_of_matmul_rate(steps_per_second)}
            values = metrics_logger.log(done, averaged, prefix="train/")
            if values:
                bar.set_postfix(loss=f"{values['train/loss']:.3f}",
                                samples_per_s=f"{values['train/samples_per_second']:.0f}")
        _evaluate_and_sample(done, model, ema, dataset, validation, config, context, compute_dtype, metrics_logger,
                             family)
        checkpointer.save_when_due(done, context, model, optimizer, ema, every=config.checkpoint_every, last=end_step)
    bar.close()
    metrics_logger.close()
    checkpointer.finish(end_step, context, model, ema)
    return TrainingResult(checkpointer.export_dir, step=end_step, total_steps=config.steps)


def _ema_model(model: nn.Module, ema: ExponentialMovingAverage, family: SundaeFamily) -> nn.Module:
    copy = family.model_class(model.config).to(next(model.parameters()).device)
    ema.copy_to(copy)
    return copy
