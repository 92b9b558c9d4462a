"""VAR's training objective: next-scale cross-entropy over every scale in one teacher-forced pass
(Tian et al. 2024, Eq. 6); builds no networks, as :mod:`sundae.sundae` for SUNDAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sundae.config import scale_lengths


def next_scale_loss(model: nn.Module, quantizer: nn.Module, tokens: Tensor,
                    class_labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy of packed multi-scale ``tokens`` (B, 1, L) under ``model``, whose inputs are
    made from the true coarser scales by the (frozen) multi-scale ``quantizer``.

    Metrics: ``accuracy`` (argmax = target, all positions) and ``last_scale_loss`` (the finest scale's
    cross-entropy, the one that bounds the image's detail), detached.
    """
    inputs = quantizer.teacher_inputs(tokens)
    logits = model(inputs, class_labels).float()  # (B, L, v)
    targets = tokens.flatten(1)
    per_position = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
    last = scale_lengths(model.config.scales)[-1]
    with torch.no_grad():
        metrics = {"accuracy": (logits.argmax(dim=-1) == targets).float().mean(),
                   "last_scale_loss": per_position[:, -last:].mean()}
    return per_position.mean(), metrics
