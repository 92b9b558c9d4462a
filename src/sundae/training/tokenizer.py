"""Training loop of the VQ-GAN tokenizer (paper §3.5, Table 4, Eq. 7): orchestration only.

The loss math lives in :mod:`sundae.tokenizer.losses` (L1 + perceptual + patch-GAN with the
adaptive weight λ, codebook + commitment terms). Here :func:`generator_step` and
:func:`discriminator_step` each run one update with its own AdamW optimizer (gradients clipped,
autocast in the training precision); the loop alternates them (the discriminator from
``discriminator_start`` on), restarts dead codes (:class:`DeadCodeReviver`), runs DDP under
``torchrun``, logs codebook usage and perplexity, saves reconstruction grids
(:mod:`sundae.eval.reconstruction`), and writes atomic, exactly resumable checkpoints.

Output directory layout::

    OUT/checkpoint/   config.json, model.safetensors, discriminator.safetensors, training_state.pt
    OUT/tokenizer/    config.json, model.safetensors     (the usable tokenizer)
    OUT/reconstructions/step_XXXXXXX.png  (top rows: inputs, bottom rows: reconstructions)
    OUT/metrics.jsonl
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sundae.checkpoint import CheckpointError, load_weights, read_json, save_weights
from sundae.config import ConfigError, tokenizer_config_from_dict
from sundae.data.images import ImageFolder
from sundae.distributed import DistributedContext, run_distributed
from sundae.eval.reconstruction import reconstruction_metrics, save_reconstruction_grid
from sundae.runtime import autocast, resolve_training_precision
from sundae.tokenizer import VQGAN, VQGANOutput
from sundae.var.tokenizer import build_tokenizer, load_vqgan
from sundae.tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from sundae.tokenizer.losses import TokenizerLossConfig, build_perceptual_loss, discriminator_loss, generator_loss
from sundae.training.common import (
    Checkpointer, MetricsLogger, RunningMeans, StepBatchSampler, StepRate, TrainingLoopConfig, TrainingResult,
    batch_indices, check_loop_settings, check_same_settings, exported_step, is_due, learning_rate, progress_bar,
    read_training_state, recover_interrupted_checkpoint, remove_orphan_temporaries, replace_directory_atomically,
    run_locked, set_learning_rate, staging_directory, step_seed, write_training_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainingConfig(TrainingLoopConfig):
    images: str  # an image folder (recursive; class sub-folders are ignored here)
    model: dict[str, Any]  # VQGANConfig fields
    loss: dict[str, Any]  # TokenizerLossConfig fields
    discriminator: dict[str, Any]  # DiscriminatorConfig fields
    steps: int = 20_000
    batch_size: int = 8
    learning_rate: float = 1e-4
    discriminator_learning_rate: float | None = None  # None: same as learning_rate
    warmup_steps: int = 0
    schedule: str = "constant"
    betas: tuple[float, float] = (0.5, 0.9)  # taming's VQGAN betas
    weight_decay: float = 0.0
    image_every: int = 500
    revive_dead_codes_every: int | None = 200  # None: never (plain taming training)
    num_workers: int = 0
    init_from: str | None = None  # a tokenizer directory whose weights the run starts from
    decoder_only: bool = False  # train the decoder only: the codes (encoder, codebook) stay exactly as they are

    def validate(self) -> None:
        if self.decoder_only and self.init_from is None:
            raise ConfigError("decoder_only fine-tunes a trained tokenizer: give init_from (--init-from DIR)")
        check_loop_settings(self, ("steps", "batch_size", "log_every", "image_every", "checkpoint_every"))


class DeadCodeReviver:
    """Dead-code restart: every ``interval`` steps, codes no batch used since the last check are
    re-initialised to encoder outputs of the current batch (Dhariwal et al. 2020 "Jukebox" §2.2;
    Zeghidour et al. 2021). Without it a small VQ codebook collapses to a few codes on CPU-scale
    runs (we saw 14 of 512 codes in use after 300 steps).

    Usage counts are part of the training state, and the choice of replacements is seeded by the
    step, so resume stays exact; under DDP rank 0 decides and broadcasts the codebook.
    """

    def __init__(self, codebook_size: int, interval: int) -> None:
        self.interval = interval
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def observe(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().cpu(), minlength=len(self.counts))

    def after_step(self, step: int, indices: Tensor, vqgan: VQGAN, images: Tensor, seed: int,
                   context: DistributedContext) -> int:
        """Count the codes ``indices`` used at ``step`` and revive the dead ones when a window closes."""
        self.observe(indices)
        revived = self.maybe_revive(step, vqgan, images, seed, context)
        if revived and context.is_main:
            log.info("step %d: revived %d dead codes", step + 1, revived)
        return revived

    @torch.no_grad()
    def maybe_revive(self, step: int, vqgan: VQGAN, images: Tensor, seed: int, context: DistributedContext) -> int:
        """Revive dead codes when ``step`` closes a window; returns how many were revived."""
        if (step + 1) % self.interval:
            return 0
        if context.enabled:
            counts = self.counts.to(context.device)
            torch.distributed.all_reduce(counts)
            self.counts = counts.cpu()
        dead = torch.nonzero(self.counts == 0).flatten()
        weight = vqgan.quantize.embedding.weight
        if context.is_main and len(dead):
            latents = rearrange(vqgan.encode_latents(images).float(), "b d h w -> (b h w) d")
            generator = torch.Generator().manual_seed(step_seed(seed, step, 0, stream=5))
            choice = torch.randint(0, len(latents), (len(dead),), generator=generator).to(latents.device)
            weight.data[dead.to(weight.device)] = latents[choice].to(weight.dtype)
        if context.enabled:
            torch.distributed.broadcast(weight.data, src=0)
        self.counts.zero_()
        return len(dead)

    def state_dict(self) -> dict[str, Tensor]:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.counts = state["counts"].clone()


# Settings that do not change what a run computes: a resume may change them freely.
RESUMABLE_CHANGES = frozenset({"images", "output_dir", "log_every", "image_every", "checkpoint_every",
                               "stop_after_steps", "num_workers", "device", "allow_changed_settings"})


class TokenizerCheckpointer(Checkpointer):
    """OUT/checkpoint: VQ-GAN, discriminator, both optimizers and the reviver's counts; OUT/tokenizer:
    the usable tokenizer."""

    export_name = "tokenizer"

    def save(self, step: int, vqgan: VQGAN, discriminator: PatchDiscriminator,
             optimizers: dict[str, torch.optim.Optimizer], reviver: DeadCodeReviver | None) -> None:
        staging = staging_directory(self.checkpoint_dir)
        vqgan.save_pretrained(staging, extra={"training": self.config.to_dict()})
        save_weights(discriminator, staging / "discriminator.safetensors")
        write_training_state(staging, {"step": step, **{name: opt.state_dict() for name, opt in optimizers.items()},
                                       "reviver": None if reviver is None else reviver.state_dict()})
        replace_directory_atomically(staging, self.checkpoint_dir)
        self.export(step, vqgan)

    def export(self, step: int, vqgan: VQGAN) -> None:
        """The usable tokenizer, with the step it was written at (so a stale export is recognised)."""
        staging = staging_directory(self.export_dir)
        vqgan.save_pretrained(staging, extra={"step": step})
        replace_directory_atomically(staging, self.export_dir)

    def ensure_export(self, step: int, vqgan: VQGAN) -> None:
        """Re-export when the export is missing or older than the checkpoint (a kill during its swap)."""
        if exported_step(self.export_dir) != step:
            log.info("exporting the tokenizer of step %d to %s (it was missing or stale)", step, self.export_dir)
            self.export(step, vqgan)

    def restore(self, vqgan: VQGAN, discriminator: PatchDiscriminator,
                optimizers: dict[str, torch.optim.Optimizer], reviver: DeadCodeReviver | None) -> int:
        recover_interrupted_checkpoint(self.checkpoint_dir)
        recover_interrupted_checkpoint(self.export_dir)
        if not self.checkpoint_dir.exists():
            return 0
        saved = read_json(self.checkpoint_dir / "config.json")
        if tokenizer_config_from_dict(saved["config"]) != vqgan.config:
            raise CheckpointError(f"{self.checkpoint_dir} holds a tokenizer of another configuration than the one "
                                  "requested; use a new --output-dir or the same model options")
        check_same_settings(saved.get("training", {}), self.config.to_dict(), ignored=RESUMABLE_CHANGES,
                            where=self.checkpoint_dir, allowed=self.config.allow_changed_settings)
        load_weights(vqgan, self.checkpoint_dir / "model.safetensors")
        load_weights(discriminator, self.checkpoint_dir / "discriminator.safetensors")
        state = read_training_state(self.checkpoint_dir)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state[name])
        if reviver is not None and state.get("reviver") is not None:
            reviver.load_state_dict(state["reviver"])
        log.info("resumed from %s at step %d", self.checkpoint_dir, state["step"])
        return int(state["step"])


def build_loader(dataset: ImageFolder, config: TokenizerTrainingConfig, start_step: int, end_step: int,
                 context: DistributedContext) -> torch.utils.data.DataLoader:
    sampler = StepBatchSampler(dataset_size=len(dataset), batch_size=config.batch_size, seed=config.seed,
                               start_step=start_step, total_steps=end_step, rank=context.rank,
                               world_size=context.world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       pin_memory=context.device.type == "cuda")


def start_from(vqgan: VQGAN, directory: Path) -> None:
    """Initialise ``vqgan`` from a saved tokenizer of the same configuration, or a multi-scale one from
    a single-scale tokenizer of the same network (encoder, decoder and codebook; the φ convolutions keep
    their initialisation)."""
    saved = load_vqgan(directory)
    shared_fields = {name: value for name, value in vqgan.config.to_dict().items()
                     if name not in ("scales", "residual_ratio")}
    if saved.config != vqgan.config and saved.config.to_dict() != shared_fields:
        raise ConfigError(f"--init-from {directory} holds a tokenizer of another configuration than the one requested; "
                          "use the same --preset and model options")
    missing, unexpected = vqgan.load_state_dict(saved.state_dict(), strict=False)
    if unexpected or any(not name.startswith("quantize.phi.") for name in missing):
        raise ConfigError(f"--init-from {directory}: its weights do not fit this tokenizer (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def decoder_parameters(vqgan: VQGAN) -> list[nn.Parameter]:
    """Freeze everything but the decode path (encoder, ``quant_conv``, codebook) and return the decode path's
    parameters.

    Fine-tuning only the decoder after the prior was trained sharpens reconstructions without
    changing a single code, so latents and prior stay valid (a common VQ-GAN second stage)."""
    vqgan.requires_grad_(False)
    decode_path = [getattr(vqgan, name) for name in vqgan.decode_path]
    for module in decode_path:
        module.requires_grad_(True)
    return [parameter for module in decode_path for parameter in module.parameters()]


def default_discriminator_start(steps: int) -> int:
    """The GAN term starts after 3/4 of the run, at most at Table 4's step 15 000, so that a short
    run still trains its adversarial phase (a fixed 15 000 never switched it on in 300 steps)."""
    return min(15_000, (3 * steps) // 4)


# --- the step functions ----------------------------------------------------------------------


def generator_step(model: nn.Module, vqgan: VQGAN, images: Tensor, *, discriminator: nn.Module,
                   perceptual: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   step: int, loss_config: TokenizerLossConfig, compute_dtype: torch.dtype,
                   grad_clip: float) -> tuple[VQGANOutput, dict[str, Tensor]]:
    """One encoder / quantizer / decoder update on ``images`` (B, C, H, W) in [-1, 1] (Eq. 7).

    ``model`` is ``vqgan`` itself or its DDP wrapper; the adaptive weight λ differentiates through
    ``vqgan.last_layer``. Returns the forward's output (the discriminator step reuses its
    reconstructions) and the detached metrics, with the clipped gradient norm.
    """
    with autocast(images.device, compute_dtype):
        output = model(images)
        loss, metrics = generator_loss(images=images, reconstructions=output.reconstruction,
                                       quantizer_loss=output.quantizer_loss, discriminator=discriminator,
                                       perceptual=perceptual, last_layer=vqgan.last_layer, step=step,
                                       config=loss_config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    metrics["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    return output, metrics


def discriminator_step(model: nn.Module, images: Tensor, reconstructions: Tensor, *,
                       parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, step: int,
                       loss_config: TokenizerLossConfig, compute_dtype: torch.dtype,
                       grad_clip: float) -> dict[str, Tensor]:
    """One patch-discriminator update on real ``images`` against detached ``reconstructions``;
    ``model`` is the discriminator or its DDP wrapper. Returns the detached metrics."""
    with autocast(images.device, compute_dtype):
        loss, metrics = discriminator_loss(images=images, reconstructions=reconstructions.detach(),
                                           discriminator=model, step=step, config=loss_config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    return metrics


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TokenizerRun:
    """Everything one tokenizer training process works with, built by :func:`prepare_run`."""

    output_dir: Path
    dataset: ImageFolder
    vqgan: VQGAN
    discriminator: PatchDiscriminator
    generator_model: nn.Module  # vqgan, or its DDP wrapper
    discriminator_model: nn.Module  # discriminator, or its DDP wrapper
    perceptual: nn.Module
    trained: list[nn.Parameter]  # the generator's parameters that this run updates
    optimizers: dict[str, torch.optim.Optimizer]
    loss_config: TokenizerLossConfig
    compute_dtype: torch.dtype
    reviver: DeadCodeReviver | None
    checkpointer: TokenizerCheckpointer
    start_step: int
    end_step: int

    @property
    def state(self) -> tuple[Any, ...]:
        """What a checkpoint holds, in :meth:`TokenizerCheckpointer.save`'s order."""
        return self.vqgan, self.discriminator, self.optimizers, self.reviver


def prepare_run(config: TokenizerTrainingConfig, context: DistributedContext) -> TokenizerRun:
    """Build the models and optimizers (seeded by ``config.seed``) and restore the latest checkpoint."""
    output_dir = Path(config.output_dir)
    model_config = tokenizer_config_from_dict(config.model)
    loss_config = TokenizerLossConfig.from_dict(
        {"discriminator_start": default_discriminator_start(config.steps), **config.loss})
    dataset = ImageFolder(config.images, resolution=model_config.resolution, channels=model_config.in_channels)
    torch.manual_seed(config.seed)
    vqgan = build_tokenizer(model_config).to(context.device)
    if config.init_from is not None:
        start_from(vqgan, Path(config.init_from))
    trained = decoder_parameters(vqgan) if config.decoder_only else list(vqgan.parameters())
    discriminator = PatchDiscriminator(DiscriminatorConfig.from_dict(
        {"in_channels": model_config.out_channels, **config.discriminator})).to(context.device)
    perceptual = build_perceptual_loss(loss_config).to(context.device)
    fused = context.device.type == "cuda"
    optimizers = {
        "generator": torch.optim.AdamW(trained, lr=config.learning_rate, betas=config.betas,
                                       weight_decay=config.weight_decay, fused=fused),
        "discriminator": torch.optim.AdamW(discriminator.parameters(), lr=config.learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=fused),
    }
    checkpointer = TokenizerCheckpointer(output_dir, config)
    if context.is_main:
        remove_orphan_temporaries(output_dir)
    reviver = None
    if config.revive_dead_codes_every is not None and model_config.quantizer == "vq" and not config.decoder_only:
        reviver = DeadCodeReviver(model_config.codebook_size, config.revive_dead_codes_every)
    start_step = checkpointer.restore(vqgan, discriminator, optimizers, reviver)
    end_step = config.steps if config.stop_after_steps is None else min(config.steps, start_step + config.stop_after_steps)
    generator_model: nn.Module = vqgan
    discriminator_model: nn.Module = discriminator
    if context.enabled:
        device_ids = [context.local_rank] if context.device.type == "cuda" else None
        generator_model = DistributedDataParallel(vqgan, device_ids=device_ids)
        discriminator_model = DistributedDataParallel(discriminator, device_ids=device_ids)
    return TokenizerRun(
        output_dir=output_dir, dataset=dataset, vqgan=vqgan, discriminator=discriminator,
        generator_model=generator_model, discriminator_model=discriminator_model, perceptual=perceptual,
        trained=trained, optimizers=optimizers, loss_config=loss_config,
        compute_dtype=resolve_training_precision(config.precision, context.device), reviver=reviver,
        checkpointer=checkpointer, start_step=start_step, end_step=end_step)


def _log_settings(run: TokenizerRun, config: TokenizerTrainingConfig, context: DistributedContext) -> None:
    model_config = run.vqgan.config
    log.info("tokenizer: %s parameters, f=%d, codebook %d, perceptual features: %s, %d images from %s",
             f"{sum(p.numel() for p in run.vqgan.parameters()):,}", model_config.downsample_factor,
             model_config.codebook_size, run.perceptual.source, len(run.dataset), config.images)
    gan_start = (f"from step {run.loss_config.discriminator_start}"
                 if run.loss_config.discriminator_active(config.steps - 1) else "never (starts after the last step)")
    log.info("settings: %d steps x batch %d, lr %g, precision %s (%s), GAN loss %s, dead-code restarts %s",
             config.steps, config.batch_size * context.world_size, config.learning_rate, config.precision,
             str(run.compute_dtype).removeprefix("torch."), gan_start,
             "off" if run.reviver is None else f"every {config.revive_dead_codes_every} steps")


def train_tokenizer(config: TokenizerTrainingConfig) -> TrainingResult:
    """Train (or resume) a VQ-GAN; returns the exported tokenizer directory and the step reached."""
    return run_distributed(lambda context: run_locked(Path(config.output_dir), context, lambda: _train(config, context)),
                           config.device)


def fixed_images_of(dataset: ImageFolder, seed: int, device: torch.device) -> Tensor:
    """The up to 8 images whose reconstructions every grid and ``reconstruction/`` metric shows."""
    indices = batch_indices(0, dataset_size=len(dataset), batch_size=min(8, len(dataset)), seed=seed + 1)
    return torch.stack([dataset[i][0] for i in indices]).to(device)


def save_reconstructions(vqgan: VQGAN, images: Tensor, done: int, output_dir: Path, logger: MetricsLogger) -> None:
    """The grid ``OUT/reconstructions/step_XXXXXXX.png`` and the ``reconstruction/`` metrics of ``images``."""
    path = save_reconstruction_grid(vqgan, images, output_dir / "reconstructions" / f"step_{done:07d}.png")
    logger.log(done, reconstruction_metrics(vqgan, images), prefix="reconstruction/")
    log.info("reconstructions at step %d: %s", done, path)


def _train(config: TokenizerTrainingConfig, context: DistributedContext) -> TrainingResult:
    run = prepare_run(config, context)
    vqgan, loss_config = run.vqgan, run.loss_config
    discriminator_lr_ratio = (config.discriminator_learning_rate or config.learning_rate) / config.learning_rate
    fixed_images = fixed_images_of(run.dataset, config.seed, context.device)
    metrics_logger = MetricsLogger(run.output_dir, enabled=context.is_main, resume_step=run.start_step)
    if context.is_main:
        _log_settings(run, config, context)
        if run.start_step == 0:
            metrics_logger.log(0, reconstruction_metrics(vqgan, fixed_images), prefix="reconstruction/")
    bar = progress_bar(total=config.steps, initial=run.start_step, enabled=context.is_main,
                       description="train tokenizer")
    running = RunningMeans()
    rate = StepRate(run.start_step, config.batch_size * context.world_size)
    loader = build_loader(run.dataset, config, run.start_step, run.end_step, context)
    for step, (images, _) in enumerate(loader, start=run.start_step):
        images = images.to(context.device, non_blocking=True)
        lr = learning_rate(step, base=config.learning_rate, warmup_steps=config.warmup_steps,
                           total_steps=config.steps, schedule=config.schedule)
        set_learning_rate(run.optimizers["generator"], lr)
        set_learning_rate(run.optimizers["discriminator"], lr * discriminator_lr_ratio)
        torch.manual_seed(step_seed(config.seed, step, context.rank, stream=3))  # dropout / gumbel noise of this step
        output, metrics = generator_step(
            run.generator_model, vqgan, images, discriminator=run.discriminator, perceptual=run.perceptual,
            parameters=run.trained, optimizer=run.optimizers["generator"], step=step, loss_config=loss_config,
            compute_dtype=run.compute_dtype, grad_clip=config.grad_clip)
        if loss_config.discriminator_active(step):
            metrics.update(discriminator_step(
                run.discriminator_model, images, output.reconstruction,
                parameters=list(run.discriminator.parameters()), optimizer=run.optimizers["discriminator"],
                step=step, loss_config=loss_config, compute_dtype=run.compute_dtype, grad_clip=config.grad_clip))
        metrics.update(perplexity=output.perplexity, codebook_usage=output.codebook_usage)
        if run.reviver is not None:
            run.reviver.after_step(step, output.indices, vqgan, images, config.seed, context)
        running.add(metrics)
        bar.update(1)
        done = step + 1
        if is_due(done, config.log_every, run.end_step):
            metrics_logger.log(done, {**running.pop(context), **rate.metrics(rate.steps_per_second(done))},
                               prefix="train/")
        if context.is_main and is_due(done, config.image_every, config.steps):
            save_reconstructions(vqgan, fixed_images, done, run.output_dir, metrics_logger)
        run.checkpointer.save_when_due(done, context, *run.state, every=config.checkpoint_every, last=run.end_step)
    bar.close()
    metrics_logger.close()
    run.checkpointer.finish(run.end_step, context, vqgan)
    return TrainingResult(run.output_dir / "tokenizer", step=run.end_step, total_steps=config.steps)
