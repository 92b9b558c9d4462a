"""The SUNDAE training process: corruption, step unrolling and the unrolled loss (paper §3.3).

Pure functions over any denoiser ``model(tokens (B, h, w), class_labels) -> logits (B, h, w, v)``;
nothing here builds a network.

* :func:`corrupt` — Eq. 5: per-sample threshold ``t ~ U[0, 1]``, mask ``M = R < t`` with
  ``R ~ U[0, 1]`` per token, and masked tokens replaced by draws of the uniform prior ``p_0``.
* :func:`unroll` — ``T`` steps ``z_t ~ f_θ(· | z_{t-1})``, keeping every step's logits.
* :func:`sundae_loss` — Eq. 6: the mean over the ``T`` steps of the cross-entropy between each
  step's logits and the clean tokens (the target, not the noise).

All randomness goes through an optional explicit ``torch.Generator`` living on the tokens'
device, so a seeded run is reproducible and nothing leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sundae.errors import InputError
from sundae.runtime import unwrap_model

Denoiser = Callable[..., Tensor]  # model(tokens, class_labels) -> logits


def sample_categorical(logits: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One draw per position from ``softmax(logits)`` over the last axis, by Gumbel-max.

    ``argmax(logits + Gumbel noise)`` is an exact categorical sample that needs only uniform
    noise, so it is deterministic given ``generator`` and never syncs with the host. Scale the
    logits beforehand for a temperature. Returns int64 of shape ``logits.shape[:-1]``.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.argmax(logits.float() + gumbel, dim=-1)


def corrupt(
    tokens: Tensor,
    codebook_size: int,
    *,
    generator: torch.Generator | None = None,
    threshold: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 5: replace a random fraction ``t_i`` of sample ``i``'s tokens by uniform random codes.

    ``threshold`` is ``t``: None draws ``t_i ~ U[0, 1]`` per sample, a float or a (B,) tensor
    fixes it. Returns ``(corrupted, mask)`` with ``mask`` True where the uniform draw was used
    (a draw may equal the original token, with probability ``1 / codebook_size``).
    """
    if codebook_size < 1:
        raise InputError(f"codebook_size must be >= 1, got {codebook_size}")
    batch = tokens.shape[0]
    if threshold is None:
        threshold = torch.rand(batch, generator=generator, device=tokens.device)
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=tokens.device)
    if threshold.dim() not in (0, 1) or (threshold.dim() == 1 and threshold.shape[0] != batch):
        raise InputError(f"threshold must be a float or a ({batch},) tensor, got shape {tuple(threshold.shape)}")
    per_token_threshold = threshold.reshape(-1, *([1] * (tokens.dim() - 1)))  # (B or 1, 1, ...)
    uniform = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    mask = uniform < per_token_threshold
    noise = torch.randint(0, codebook_size, tokens.shape, generator=generator, device=tokens.device,
                          dtype=tokens.dtype)
    return torch.where(mask, noise, tokens), mask


def unroll(
    model: Denoiser,
    tokens_0: Tensor,
    steps: int,
    *,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Run ``steps`` unroll steps from ``tokens_0`` and return each step's logits.

    Step ``t`` computes ``logits_t = f(z_{t-1})`` and samples ``z_t ~ softmax(logits_t)``. The
    sample is drawn without gradient (a discrete draw has none, and not recording it keeps the
    softmax out of the graph), so step ``t``'s logits depend on the parameters but not on step
    ``t-1``'s logits. ``z_T`` is not drawn: nothing uses it.
    """
    if steps < 1:
        raise InputError(f"unroll needs at least one step, got steps={steps}")
    logits_per_step = []
    tokens = tokens_0
    for step in range(steps):
        logits = model(tokens, class_labels)
        logits_per_step.append(logits)
        if step < steps - 1:
            with torch.no_grad():
                tokens = sample_categorical(logits.detach(), generator=generator)
    return logits_per_step


def sundae_loss(
    model: Denoiser,
    tokens: Tensor,
    *,
    unroll_steps: int = 2,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    codebook_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 6: corrupt ``tokens`` (B, h, w), unroll ``unroll_steps`` times, average the cross-entropies.

    ``codebook_size`` defaults to ``model.config.codebook_size`` (DDP / torch.compile wrappers
    are looked through). Cross-entropies are computed in float32 even under autocast.

    Returns ``(loss, metrics)``; ``metrics`` holds detached 0-d tensors (no host sync here):
    ``ce_step{i}`` and ``acc_step{i}`` for ``i = 1..T`` (token cross-entropy and accuracy of
    step ``i`` against the clean tokens) and ``corruption_rate`` (fraction of masked tokens).
    """
    if codebook_size is None:
        codebook_size = _model_codebook_size(model)
    corrupted, mask = corrupt(tokens, codebook_size, generator=generator)
    logits_per_step = unroll(model, corrupted, unroll_steps, class_labels=class_labels, generator=generator)
    targets = tokens.reshape(-1).long()
    metrics: dict[str, Tensor] = {"corruption_rate": mask.float().mean().detach()}
    losses = []
    for step, logits in enumerate(logits_per_step, start=1):
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        cross_entropy = F.cross_entropy(flat_logits, targets)
        losses.append(cross_entropy)
        metrics[f"ce_step{step}"] = cross_entropy.detach()
        metrics[f"acc_step{step}"] = (flat_logits.detach().argmax(dim=-1) == targets).float().mean()
    return torch.stack(losses).mean(), metrics


def _model_codebook_size(model: Denoiser) -> int:
    config = getattr(unwrap_model(model), "config", None)  # type: ignore[arg-type]
    codebook_size = getattr(config, "codebook_size", None)
    if codebook_size is None:
        raise InputError(
            f"cannot read the codebook size from a {type(model).__name__} (no config.codebook_size); "
            "pass codebook_size= to sundae_loss"
        )
    return codebook_size


__all__ = ["corrupt", "sample_categorical", "sundae_loss", "unroll"]
