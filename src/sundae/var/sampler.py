"""VAR's sampler: one forward pass per scale, coarse to fine (spec seed 003; Tian et al. 2024, §3.1).

Scale k's tokens are drawn all at once from the transformer's logits given the coarser scales (their
keys and values cached), then added to the running feature map f̂, from which the next scale's input
is made. Knobs (:class:`~sundae.config.NextScaleOptions`): temperature, top-k / top-p and
classifier-free guidance, ramped over the scales as VAR does or constant. Draws use the SUNDAE
sampler's counter-based random numbers, so sample ``i`` depends only on ``seeds[i]``, whatever the
batch.

Inpainting and outpainting take any token mask on the finest grid: at every scale the positions whose
whole footprint is known are teacher-forced to the known image's tokens of that scale (so the finest
known tokens come out unchanged), and the rest are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sundae.config import NextScaleOptions
from sundae.errors import InputError
from sundae.sampler import (categorical_from_uniform, filter_logits, guide, position_hashes, seed_keys,
                            seeds_from_generator, step_key, uniform_bits, uniform_float)

_STREAM_SCALE = 7  # the random stream of VAR draws (the SUNDAE sampler uses 1-3)

# (scale from 0, the tokens of the scales so far (B, 1, L_k), a prefix of the packed row) after every scale;
# returning False stops there
ScaleCallback = Callable[[int, Tensor], "bool | None"]


@dataclass
class NextScaleOutput:
    tokens: Tensor  # (B, 1, L) packed multi-scale tokens, coarsest scale first
    scales_done: int  # scales sampled (all of them unless a callback stopped early)
    trajectory: list[Tensor] | None = None  # per scale, the prefix (B, 1, L_k) on CPU, when asked for


def known_at_scale(known: Tensor, side: int) -> Tensor:
    """(B, S, S) bool known positions of the finest grid -> (B, side, side): known where every finest
    position the coarser token covers is known (its area average is exactly 1)."""
    if known.shape[-1] == side:
        return known
    covered = F.interpolate(known[:, None].float(), size=(side, side), mode="area")[:, 0]
    return covered >= 1.0 - 1e-6


def _check_inputs(model: nn.Module, quantizer: nn.Module, labels: Tensor | None, seeds: Tensor,
                  known_tokens: Tensor | None, known_mask: Tensor | None) -> None:
    config = model.config
    if tuple(quantizer.scales) != tuple(config.scales) or quantizer.embedding.num_embeddings != config.codebook_size:
        raise InputError(f"the prior was trained on scales {config.scales} of {config.codebook_size} codes, the "
                         f"tokenizer has scales {tuple(quantizer.scales)} of {quantizer.embedding.num_embeddings}")
    if labels is not None and labels.shape != seeds.shape:
        raise InputError(f"class_labels must have shape ({seeds.shape[0]},), got {tuple(labels.shape)}")
    if (known_tokens is None) != (known_mask is None):
        raise InputError("inpainting needs both known_tokens and known_mask")
    if known_tokens is not None and known_mask is not None:
        side = config.scales[-1]
        if tuple(known_tokens.shape) != (seeds.shape[0], 1, config.sequence_length):
            raise InputError(f"known_tokens must be ({seeds.shape[0]}, 1, {config.sequence_length}), "
                             f"got {tuple(known_tokens.shape)}")
        if tuple(known_mask.shape) != (seeds.shape[0], side, side) or known_mask.dtype != torch.bool:
            raise InputError(f"known_mask must be a bool ({seeds.shape[0]}, {side}, {side}) mask of the finest "
                             f"grid, got {known_mask.dtype} {tuple(known_mask.shape)}")


def scale_logits(model: nn.Module, scale: int, inputs: Tensor | None, labels: Tensor | None, caches: list,
                 batch: int, *, guided: bool, guidance: float) -> Tensor:
    """Scale ``scale``'s logits (B, s², v) in fp32 from the cached forward; when ``guided``, ``labels`` are
    the doubled batch's (conditional rows, then their null-class copies, as the caches hold) and the logits
    are guided."""
    if not guided:
        return model.forward_scale(scale, inputs, labels, caches, batch).float()
    both = model.forward_scale(scale, None if inputs is None else torch.cat([inputs, inputs]), labels, caches,
                               2 * batch)
    return guide(both, guidance)


@torch.inference_mode()
def sample_next_scale(
    model: nn.Module,
    quantizer: nn.Module,
    *,
    options: NextScaleOptions = NextScaleOptions(),
    num_samples: int | None = None,
    class_labels: Tensor | None = None,
    seeds: Tensor | list[int] | None = None,
    generator: torch.Generator | None = None,
    known_tokens: Tensor | None = None,
    known_mask: Tensor | None = None,
    use_cache: bool = True,
    callback: ScaleCallback | None = None,
    return_trajectory: bool = False,
) -> NextScaleOutput:
    """Draw packed multi-scale tokens (B, 1, L) from a :class:`~sundae.var.transformer.NextScaleTransformer`.

    Args:
        model, quantizer: the prior and its tokenizer's :class:`~sundae.var.tokenizer.MultiScaleQuantizer`.
        options: temperature, top-k/p, guidance and its schedule.
        num_samples: batch size when neither ``seeds`` nor ``class_labels`` give it.
        class_labels: (B,) classes of a conditional model (None: unconditional, the null class).
        seeds: one integer seed per sample (None: drawn from ``generator``).
        known_tokens, known_mask: inpainting; the known image's packed tokens (B, 1, L) and a (B, S, S)
            bool mask of the finest grid, True where known (see the module docstring).
        use_cache: cache the coarser scales' keys and values (one pass over each scale's new tokens);
            False recomputes the whole block-causal forward for every scale (the same tokens, slower).
        callback: called after every scale with (scale, the tokens so far, a prefix (B, 1, L_k) of the
            packed row that the tokenizer decodes to the coarse preview); returning False stops there.
        return_trajectory: keep a CPU copy of every scale's prefix (one frame per scale).
    """
    device = model.start.device
    count = next((len(x) for x in (seeds, class_labels) if x is not None), num_samples)
    if count is None or count < 1:
        raise InputError("give num_samples >= 1, seeds or class_labels")
    seeds = seeds_from_generator(count, generator) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    labels = None if class_labels is None else class_labels.to(device)
    _check_inputs(model, quantizer, labels, seeds, known_tokens, known_mask)
    guided = labels is not None and not (options.guidance_scale == 1.0 and options.guidance_schedule == "constant")
    if labels is not None and options.guidance_scale == 0.0 and options.guidance_schedule == "constant":
        labels, guided = torch.full_like(labels, model.config.null_class), False  # the unconditional path
    if guided:  # every row once with its class and once with the null class, made once for all scales
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    keys = seed_keys(seeds.to(device))
    scales = model.config.scales
    known_grids = None if known_tokens is None else quantizer.split(known_tokens.to(device))
    caches = model.new_caches()
    partial = torch.zeros(count, quantizer.embedding.embedding_dim, scales[-1], scales[-1], device=device)
    grids: list[Tensor] = []
    inputs_so_far: list[Tensor] = []
    trajectory: list[Tensor] | None = [] if return_trajectory else None
    for scale, side in enumerate(scales):
        inputs = None if scale == 0 else quantizer.scale_input(partial, scale)
        guidance = options.guidance_at(scale, len(scales))
        if use_cache:
            logits = scale_logits(model, scale, inputs, labels, caches, count, guided=guided, guidance=guidance)
        else:
            if inputs is not None:
                inputs_so_far.append(inputs)
            logits = _recomputed_logits(model, inputs_so_far, labels, guided, guidance, count, device, side)
        logits = filter_logits(logits / options.temperature, top_k=options.top_k, top_p=options.top_p)
        uniform = uniform_float(uniform_bits(keys, step_key(scale, _STREAM_SCALE), position_hashes(side * side, device)))
        grid = categorical_from_uniform(logits, uniform).view(count, side, side)
        if known_grids is not None:
            grid = torch.where(known_at_scale(known_mask.to(device), side), known_grids[scale], grid)
        grids.append(grid)
        partial = partial + quantizer.contribution(scale, grid)
        if callback is None and trajectory is None:
            continue
        prefix = quantizer.join(grids)
        if trajectory is not None:
            trajectory.append(prefix.cpu())
        if callback is not None and callback(scale, prefix) is False:
            break
    done = len(grids)  # stopped early: the finer scales stay at code 0 of the packed row
    grids += [torch.zeros(count, side, side, dtype=torch.long, device=device) for side in scales[done:]]
    return NextScaleOutput(tokens=quantizer.join(grids), scales_done=done, trajectory=trajectory)


def _recomputed_logits(model: nn.Module, inputs: list[Tensor], labels: Tensor | None, guided: bool, guidance: float,
                       count: int, device: torch.device, side: int) -> Tensor:
    """The newest scale's logits from a whole block-causal forward over every scale so far (no cache)."""
    rows = torch.cat(inputs, dim=1) if inputs else torch.zeros(count, 0, model.config.embed_dim, device=device)
    if guided:  # labels: the doubled batch's, as in scale_logits
        return guide(model(torch.cat([rows, rows]), labels)[:, -side * side:], guidance)
    return model(rows, labels)[:, -side * side:].float()
