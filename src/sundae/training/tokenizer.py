"""Training loop of the VQ-GAN tokenizer (paper §3.5, Table 4, Eq. 7): orchestration only.

The loss math lives in :mod:`sundae.tokenizer.losses` (L1 + perceptual + patch-GAN with the
adaptive weight λ, codebook + commitment terms); this module alternates generator and
discriminator steps with two AdamW optimizers, clips gradients, runs bf16 autocast on CUDA and
DDP under ``torchrun``, logs codebook usage and perplexity, saves reconstruction grids, and
writes atomic, exactly resumable checkpoints.

Output directory layout::

    OUT/checkpoint/   config.json, model.safetensors, discriminator.safetensors, training_state.pt
    OUT/tokenizer/    config.json, model.safetensors     (the usable tokenizer)
    OUT/reconstructions/step_XXXXXXX.png  (top rows: inputs, bottom rows: reconstructions)
    OUT/metrics.jsonl
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sundae.checkpoint import CheckpointError, load_weights, read_json, save_weights
from sundae.config import ConfigBase, ConfigError, VQGANConfig
from sundae.data.images import DatasetError, ImageFolder, UnreadableImageError, save_image_grid
from sundae.runtime import PRECISION_CHOICES, autocast, resolve_training_precision
from sundae.tokenizer import VQGAN
from sundae.tokenizer.vqgan import codebook_statistics
from sundae.tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from sundae.tokenizer.losses import TokenizerLossConfig, build_perceptual_loss, discriminator_loss, generator_loss
from sundae.training.common import (
    MetricsLogger, StepBatchSampler, batch_indices, check_same_settings, exported_step, learning_rate, progress_bar,
    read_training_state, recover_interrupted_checkpoint, remove_orphan_temporaries, run_locked, replace_directory_atomically,
    TrainingResult, set_learning_rate, staging_directory, step_seed, write_training_state,
)
from sundae.training.distributed import DistributedContext, barrier, mean_across_ranks, run_distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainingConfig(ConfigBase):
    images: str  # an image folder (recursive; class sub-folders are ignored here)
    output_dir: str
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
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 1000
    revive_dead_codes_every: int | None = 200  # None: never (plain taming training)
    stop_after_steps: int | None = None
    num_workers: int = 0
    device: str | None = None
    precision: str = "auto"  # autocast dtype of the step: auto (bf16 where native), float32, bfloat16
    allow_changed_settings: bool = False  # resume even if settings that change the run differ from the checkpoint's
    init_from: str | None = None  # a tokenizer directory whose weights the run starts from
    decoder_only: bool = False  # train the decoder only: the codes (encoder, codebook) stay exactly as they are

    def validate(self) -> None:
        if self.decoder_only and self.init_from is None:
            raise ConfigError("decoder_only fine-tunes a trained tokenizer: give init_from (--init-from DIR)")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        for name in ("steps", "batch_size", "log_every", "image_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


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


class TokenizerCheckpointer:
    def __init__(self, output_dir: Path, config: TokenizerTrainingConfig) -> None:
        self.output_dir = output_dir
        self.config = config

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    @property
    def export_dir(self) -> Path:
        return self.output_dir / "tokenizer"

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
        if VQGANConfig.from_dict(saved["config"]) != vqgan.config:
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


@torch.no_grad()
def save_reconstruction_grid(vqgan: VQGAN, images: Tensor, path: Path) -> Path:
    vqgan.eval()
    reconstructions = vqgan(images).reconstruction.float().clamp(-1, 1)
    vqgan.train()
    count = images.shape[0]
    save_image_grid(torch.cat([images.float().cpu(), reconstructions.cpu()]), path, nrow=count)
    return path


@torch.no_grad()
def reconstruction_metrics(vqgan: VQGAN, images: Tensor) -> dict[str, float]:
    """L1 and PSNR (images mapped to [0, 1]) of the tokenizer on ``images``, plus codebook use."""
    was_training = vqgan.training
    vqgan.eval()
    output = vqgan(images)
    vqgan.train(was_training)
    reconstructions = output.reconstruction.float().clamp(-1, 1)
    l1 = (reconstructions - images).abs().mean().item() / 2.0
    mse = (((reconstructions - images) / 2.0) ** 2).flatten(1).mean(dim=1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    return {"l1": l1, "psnr": psnr, "perplexity": output.perplexity.item(), "codebook_usage": output.codebook_usage.item()}


def start_from(vqgan: VQGAN, directory: Path) -> None:
    """Initialise ``vqgan`` from a saved tokenizer of the same configuration."""
    saved = VQGAN.from_pretrained(directory)
    if saved.config != vqgan.config:
        raise ConfigError(f"--init-from {directory} holds a tokenizer of another configuration than the one requested; "
                          "use the same --preset and model options")
    vqgan.load_state_dict(saved.state_dict())


def decoder_parameters(vqgan: VQGAN) -> list[nn.Parameter]:
    """Freeze the encoder, ``quant_conv`` and codebook and return the decoder path's parameters.

    Fine-tuning only the decoder after the prior was trained sharpens reconstructions without
    changing a single code, so latents and prior stay valid (a common VQ-GAN second stage)."""
    for module in (vqgan.encoder, vqgan.quant_conv, vqgan.quantize):
        module.requires_grad_(False)
    return [*vqgan.post_quant_conv.parameters(), *vqgan.decoder.parameters()]


def default_discriminator_start(steps: int) -> int:
    """The GAN term starts after 3/4 of the run, at most at Table 4's step 15 000, so that a short
    run still trains its adversarial phase (a fixed 15 000 never switched it on in 300 steps)."""
    return min(15_000, (3 * steps) // 4)


@torch.no_grad()
def measure_reconstructions(vqgan: VQGAN, folder: ImageFolder, *, limit: int, batch_size: int,
                            progress: bool = False) -> dict[str, Any]:
    """L1 / PSNR / codebook statistics over up to ``limit`` readable images spread evenly over the
    (class-sorted) folder. Unreadable files are skipped and counted, never replaced by a neighbour."""
    from tqdm.auto import tqdm

    device = next(vqgan.parameters()).device
    step = max(1, len(folder) // max(1, min(limit, len(folder))))
    positions = list(range(0, len(folder), step))[:limit]
    totals: dict[str, float] = {"l1": 0.0, "psnr": 0.0}
    shown = set(positions[:: max(1, len(positions) // 16)][:16])  # the grid: an even spread, every class
    codes, grid, count, unreadable = [], [], 0, []
    with tqdm(total=len(positions), unit="image", desc="reconstruct", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(positions), batch_size):
            batch = []
            for position in positions[start:start + batch_size]:
                try:
                    batch.append(folder.load(position))
                    if position in shown:
                        grid.append(batch[-1])
                except UnreadableImageError as error:
                    unreadable.append(folder.relative_paths[position])
                    log.warning("skipping unreadable image %s", error)
            bar.update(len(positions[start:start + batch_size]))
            if not batch:
                continue
            images = torch.stack(batch).to(device)
            measured = reconstruction_metrics(vqgan, images)
            for name in totals:
                totals[name] += measured[name] * len(images)
            count += len(images)
            codes.append(vqgan.encode(images).cpu())
    if not count:
        raise DatasetError(f"none of the {len(positions)} images tried under {folder.root} could be read")
    perplexity, usage = codebook_statistics(torch.cat(codes), vqgan.config.codebook_size)
    return {"images": count, "unreadable": len(unreadable), **{k: round(v / count, 4) for k, v in totals.items()},
            "perplexity": round(perplexity.item(), 4), "codebook_usage": round(usage.item(), 4),
            "grid_images": torch.stack(grid)}


def train_tokenizer(config: TokenizerTrainingConfig) -> TrainingResult:
    """Train (or resume) a VQ-GAN; returns the exported tokenizer directory and the step reached."""
    return run_distributed(lambda context: run_locked(Path(config.output_dir), context, lambda: _train(config, context)),
                           config.device)


def _train(config: TokenizerTrainingConfig, context: DistributedContext) -> TrainingResult:
    output_dir = Path(config.output_dir)
    model_config = VQGANConfig.from_dict(config.model)
    loss_config = TokenizerLossConfig.from_dict(
        {"discriminator_start": default_discriminator_start(config.steps), **config.loss})
    dataset = ImageFolder(config.images, resolution=model_config.resolution, channels=model_config.in_channels)
    torch.manual_seed(config.seed)
    vqgan = VQGAN(model_config).to(context.device)
    if config.init_from is not None:
        start_from(vqgan, Path(config.init_from))
    trained = decoder_parameters(vqgan) if config.decoder_only else list(vqgan.parameters())
    discriminator = PatchDiscriminator(DiscriminatorConfig.from_dict(
        {"in_channels": model_config.out_channels, **config.discriminator})).to(context.device)
    perceptual = build_perceptual_loss(loss_config).to(context.device)
    compute_dtype = resolve_training_precision(config.precision, context.device)
    fused = context.device.type == "cuda"
    optimizers = {
        "generator": torch.optim.AdamW(trained, lr=config.learning_rate, betas=config.betas,
                                       weight_decay=config.weight_decay, fused=fused),
        "discriminator": torch.optim.AdamW(discriminator.parameters(), lr=config.learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=fused),
    }
    discriminator_lr_ratio = (config.discriminator_learning_rate or config.learning_rate) / config.learning_rate
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

    fixed_images = torch.stack([dataset[i][0] for i in batch_indices(0, dataset_size=len(dataset),
                                batch_size=min(8, len(dataset)), seed=config.seed + 1)]).to(context.device)
    metrics_logger = MetricsLogger(output_dir, enabled=context.is_main, resume_step=start_step)
    if context.is_main:
        log.info("tokenizer: %s parameters, f=%d, codebook %d, perceptual features: %s, %d images from %s",
                 f"{sum(p.numel() for p in vqgan.parameters()):,}", model_config.downsample_factor,
                 model_config.codebook_size, perceptual.source, len(dataset), config.images)
        gan_start = ("never (starts after the last step)" if loss_config.discriminator_start >= config.steps
                     else f"from step {loss_config.discriminator_start}")
        log.info("settings: %d steps x batch %d, lr %g, precision %s (%s), GAN loss %s, dead-code restarts %s",
                 config.steps, config.batch_size * context.world_size, config.learning_rate, config.precision,
                 str(compute_dtype).removeprefix("torch."), gan_start,
                 "off" if reviver is None else f"every {config.revive_dead_codes_every} steps")
        if start_step == 0:
            metrics_logger.log(start_step, reconstruction_metrics(vqgan, fixed_images), prefix="reconstruction/")
    bar = progress_bar(total=config.steps, initial=start_step, enabled=context.is_main, description="train tokenizer")
    running: dict[str, Tensor] = {}
    running_count = 0
    started = time.perf_counter()
    for step, (images, _) in enumerate(build_loader(dataset, config, start_step, end_step, context), start=start_step):
        images = images.to(context.device, non_blocking=True)
        lr = learning_rate(step, base=config.learning_rate, warmup_steps=config.warmup_steps,
                           total_steps=config.steps, schedule=config.schedule)
        set_learning_rate(optimizers["generator"], lr)
        set_learning_rate(optimizers["discriminator"], lr * discriminator_lr_ratio)
        torch.manual_seed(step_seed(config.seed, step, context.rank, stream=3))  # dropout / gumbel noise of this step

        with autocast(context.device, compute_dtype):
            output = generator_model(images)
            loss, metrics = generator_loss(images=images, reconstructions=output.reconstruction,
                                           quantizer_loss=output.quantizer_loss, discriminator=discriminator,
                                           perceptual=perceptual, last_layer=vqgan.last_layer, step=step,
                                           config=loss_config)
        optimizers["generator"].zero_grad(set_to_none=True)
        loss.backward()
        metrics["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizers["generator"].step()

        if step >= loss_config.discriminator_start:
            with autocast(context.device, compute_dtype):
                d_loss, d_metrics = discriminator_loss(images=images, reconstructions=output.reconstruction.detach(),
                                                       discriminator=discriminator_model, step=step, config=loss_config)
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(discriminator.parameters(), config.grad_clip)
            optimizers["discriminator"].step()
            metrics.update(d_metrics)
        metrics.update(perplexity=output.perplexity, codebook_usage=output.codebook_usage)
        if reviver is not None:
            reviver.observe(output.indices)
            revived = reviver.maybe_revive(step, vqgan, images, config.seed, context)
            if revived and context.is_main:
                log.info("step %d: revived %d dead codes", step + 1, revived)
        for name, value in metrics.items():
            running[name] = running.get(name, 0.0) + value.detach().float()
        running_count += 1
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == end_step:
            averaged = mean_across_ranks({k: v / running_count for k, v in running.items()}, context)
            steps_per_second = (done - start_step) / (time.perf_counter() - started)
            averaged["steps_per_second"] = torch.tensor(steps_per_second)
            averaged["samples_per_second"] = torch.tensor(steps_per_second * config.batch_size * context.world_size)
            metrics_logger.log(done, averaged, prefix="train/")
            running, running_count = {}, 0
        if context.is_main and (done % config.image_every == 0 or done == config.steps):
            path = save_reconstruction_grid(vqgan, fixed_images, output_dir / "reconstructions" / f"step_{done:07d}.png")
            metrics_logger.log(done, reconstruction_metrics(vqgan, fixed_images), prefix="reconstruction/")
            log.info("reconstructions at step %d: %s", done, path)
        if done % config.checkpoint_every == 0 or done == end_step:
            if context.is_main:
                checkpointer.save(done, vqgan, discriminator, optimizers, reviver)
            barrier(context)
    bar.close()
    metrics_logger.close()
    if context.is_main:
        checkpointer.ensure_export(end_step, vqgan)
    barrier(context)
    return TrainingResult(output_dir / "tokenizer", step=end_step, total_steps=config.steps)
