"""VQ-GAN training losses: Eq. 7 of the paper (§3.5), as taming's ``VQLPIPSWithDiscriminator``.

The generator (encoder, quantizer, decoder) minimises

    L = |x - x̂| + α_PER · LPIPS(x, x̂)  +  α_VQ · L_VQ  +  λ · L_GAN,
    λ = α_GAN · ‖∇_{G_-1}[L_PIX + L_PER]‖ / (‖∇_{G_-1}[L_GAN]‖ + ε),

with ``L_GAN = -mean D(x̂)`` switched on only from ``discriminator_start`` on; the discriminator
D minimises a hinge (or softplus) loss on real images and detached reconstructions. The two are
separate step functions, :func:`generator_loss` and :func:`discriminator_loss`, each returning
``(loss, metrics)`` with metrics as detached tensors (no ``.item()``, so no device sync).

One deliberate difference from taming: its ``pixelloss_weight`` is stored but never used, while
``l1_weight`` here does scale the L1 term (the default 1.0 gives taming's numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sundae.config import ConfigBase, ConfigError
from sundae.errors import InputError
from sundae.tokenizer.perceptual import PERCEPTUAL_SOURCES, PerceptualLoss

Metrics = dict[str, torch.Tensor]


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂))), taming's ``hinge_d_loss``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean softplus(-D(x)) + mean softplus(D(x̂))): the non-saturating GAN loss, taming's ``vanilla_d_loss``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_GAN for the generator: -mean D(x̂)."""
    return -logits_fake.mean()


DISCRIMINATOR_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_discriminator_loss,
    "vanilla": vanilla_discriminator_loss,
}


def _last_layer_gradient(loss: torch.Tensor, last_layer: torch.Tensor, *, name: str) -> torch.Tensor:
    if not loss.requires_grad:
        raise InputError(
            f"{name} carries no gradient (computed under torch.no_grad or from detached tensors); "
            f"the adaptive weight needs the graph back to the decoder's last layer"
        )
    (gradient,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
    if gradient is None:
        raise InputError(
            f"{name} does not depend on last_layer: pass the weight of the decoder's final convolution, "
            f"the one that produced the reconstructions fed to the loss and the discriminator"
        )
    return gradient


def adaptive_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """λ / α_GAN of Eq. 7: ‖∇_last reconstruction‖ / (‖∇_last generator‖ + eps), clamped, detached.

    The ratio is clamped to [0, max_weight].

    ``last_layer`` is the weight of the decoder's final convolution; both losses must depend on
    it. The graphs are retained so the caller can still back-propagate the total loss.
    """
    if not last_layer.requires_grad:
        raise InputError("last_layer does not require grad: pass the decoder's final convolution weight being trained")
    reconstruction_gradient = _last_layer_gradient(reconstruction_loss, last_layer, name="reconstruction_loss")
    generator_gradient = _last_layer_gradient(generator_loss, last_layer, name="generator_loss")
    ratio = reconstruction_gradient.norm() / (generator_gradient.norm() + eps)
    return ratio.clamp(0.0, max_weight).detach()


def adopt_weight(weight: float, step: int, start_step: int) -> float:
    """``weight`` from ``start_step`` on, 0 before it (taming's ``adopt_weight``)."""
    return weight if step >= start_step else 0.0


@dataclass(frozen=True, kw_only=True)
class TokenizerLossConfig(ConfigBase):
    """Weights of Eq. 7 (α's from Table 4) and the choice of GAN and perceptual losses.

    ``perceptual`` names the perceptual features (see :mod:`sundae.tokenizer.perceptual`);
    ``"lpips-vgg"`` needs both file paths, ``"auto"`` uses them when given.
    """

    l1_weight: float = 1.0  # α_PIX
    perceptual_weight: float = 1.0  # α_PER
    codebook_weight: float = 1.0  # α_VQ, Table 4
    discriminator_weight: float = 0.5  # α_GAN, Table 4
    discriminator_start: int = 15000  # Table 4: generator step at which L_GAN switches on
    discriminator_loss: str = "hinge"  # "hinge" or "vanilla"
    perceptual: str = "auto"  # "auto", "lpips-vgg", "stlpips-vgg" or "none"
    perceptual_vgg_path: str | None = None  # torchvision's vgg16-397923af.pth, for "lpips-vgg"
    perceptual_lin_path: str | None = None  # LPIPS v0.1 vgg.pth, for "lpips-vgg"
    adaptive_weight_max: float = 1e4
    adaptive_weight_eps: float = 1e-4

    def validate(self) -> None:
        weights = {
            "l1_weight": self.l1_weight, "perceptual_weight": self.perceptual_weight,
            "codebook_weight": self.codebook_weight, "discriminator_weight": self.discriminator_weight,
        }
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ConfigError(f"loss weights must be >= 0, got {negative}")
        if self.discriminator_start < 0:
            raise ConfigError(f"discriminator_start must be >= 0, got {self.discriminator_start}")
        if self.discriminator_loss not in DISCRIMINATOR_LOSSES:
            raise ConfigError(
                f"discriminator_loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {self.discriminator_loss!r}"
            )
        if self.perceptual not in PERCEPTUAL_SOURCES:
            raise ConfigError(f"perceptual must be one of {PERCEPTUAL_SOURCES}, got {self.perceptual!r}")
        paths_given = (self.perceptual_vgg_path is not None, self.perceptual_lin_path is not None)
        if paths_given[0] != paths_given[1]:
            raise ConfigError("perceptual_vgg_path and perceptual_lin_path go together: give both or neither")
        if self.perceptual == "lpips-vgg" and not all(paths_given):
            raise ConfigError(
                "perceptual='lpips-vgg' needs perceptual_vgg_path (torchvision's vgg16-397923af.pth) "
                "and perceptual_lin_path (LPIPS v0.1 vgg.pth)"
            )
        if self.perceptual in ("stlpips-vgg", "none") and any(paths_given):
            raise ConfigError(f"perceptual={self.perceptual!r} does not use the LPIPS file paths; remove them")
        if self.adaptive_weight_max <= 0 or self.adaptive_weight_eps <= 0:
            raise ConfigError("adaptive_weight_max and adaptive_weight_eps must be > 0")

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms count at this step (a loop can skip the D update before)."""
        return adopt_weight(1.0, step, self.discriminator_start) > 0.0


def build_perceptual_loss(config: TokenizerLossConfig) -> PerceptualLoss:
    """The perceptual network named by ``config.perceptual`` (logs which features it uses)."""
    return PerceptualLoss.from_source(
        config.perceptual, vgg_path=config.perceptual_vgg_path, lin_path=config.perceptual_lin_path
    )


def _check_image_pair(images: torch.Tensor, reconstructions: torch.Tensor) -> None:
    if images.shape != reconstructions.shape:
        raise InputError(
            f"images and reconstructions must have the same shape, got {tuple(images.shape)} "
            f"and {tuple(reconstructions.shape)}"
        )


def generator_loss(
    *,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    quantizer_loss: torch.Tensor,
    discriminator: nn.Module,
    perceptual: PerceptualLoss,
    last_layer: torch.Tensor,
    step: int,
    config: TokenizerLossConfig,
) -> tuple[torch.Tensor, Metrics]:
    """Eq. 7 for the encoder/quantizer/decoder update.

    images, reconstructions: (B, C, H, W) in [-1, 1]; quantizer_loss: the quantizer's L_VQ;
    last_layer: the decoder's final convolution weight. Before ``discriminator_start`` the
    discriminator is not run and no adaptive weight is computed. Under ``torch.no_grad``
    (validation) the adversarial term is reported but not added, as λ needs gradients.

    The discriminator's parameters receive gradients from this loss: freeze them
    (``requires_grad_(False)``) for the generator step or zero them before the discriminator step.
    """
    _check_image_pair(images, reconstructions)
    zero = images.new_zeros(())
    l1 = (images - reconstructions).abs().mean()
    distance = perceptual(images, reconstructions).mean() if config.perceptual_weight > 0 else zero
    reconstruction = config.l1_weight * l1 + config.perceptual_weight * distance
    quantizer = quantizer_loss.mean()
    loss = reconstruction + config.codebook_weight * quantizer

    adversarial, weight = zero, zero
    factor = adopt_weight(1.0, step, config.discriminator_start)
    if factor * config.discriminator_weight > 0:
        adversarial = generator_adversarial_loss(discriminator(reconstructions))
        if torch.is_grad_enabled():
            ratio = adaptive_weight(
                reconstruction, adversarial, last_layer,
                max_weight=config.adaptive_weight_max, eps=config.adaptive_weight_eps,
            )
            weight = ratio * config.discriminator_weight
            loss = loss + weight * factor * adversarial

    metrics = {
        "loss": loss, "l1": l1, "perceptual": distance, "reconstruction": reconstruction,
        "quantizer": quantizer, "adversarial": adversarial, "adversarial_weight": weight,
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


def discriminator_loss(
    *,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    discriminator: nn.Module,
    step: int,
    config: TokenizerLossConfig,
) -> tuple[torch.Tensor, Metrics]:
    """The discriminator update on real images and detached reconstructions.

    As in taming the loss is multiplied by 0 before ``discriminator_start`` (the logits are
    still reported); a loop can skip the call and the optimiser step with
    ``config.discriminator_active(step)``.
    """
    _check_image_pair(images, reconstructions)
    logits_real = discriminator(images.detach())
    logits_fake = discriminator(reconstructions.detach())
    unweighted = DISCRIMINATOR_LOSSES[config.discriminator_loss](logits_real, logits_fake)
    loss = adopt_weight(1.0, step, config.discriminator_start) * unweighted
    metrics = {
        "discriminator_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean(),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


__all__ = [
    "TokenizerLossConfig", "adaptive_weight", "adopt_weight", "build_perceptual_loss", "discriminator_loss",
    "generator_adversarial_loss", "generator_loss", "hinge_discriminator_loss", "vanilla_discriminator_loss",
    "DISCRIMINATOR_LOSSES",
]
