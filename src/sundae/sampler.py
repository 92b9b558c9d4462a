"""The one SUNDAE sampling loop (paper §3.4, §3.6; Savinov et al. 2022 §3).

Starting from uniform random tokens (or from given tokens), each of ``steps`` iterations computes
the denoiser's logits, draws new tokens at an annealed temperature, and writes them into a random
``proportion`` of the positions. A sample stops on its own once a step that updated at least one
of its free (not kept) positions leaves it unchanged, at step ``min_steps`` at the earliest; a step
whose random draw updated none of its free positions could not have changed it, so it says nothing
about convergence and never stops it. Finished samples are frozen at once on the device and leave
the forward batch at the next compaction, so they cost nothing afterwards. A keep-mask pins known
tokens (inpainting, outpainting, refinement), and classifier-free guidance mixes conditional and
null-class logits.

Randomness is counter-based: every random number is a hash of (sample seed, step, stream,
position) computed on the device. Hence a sample depends only on its own seed, never on the batch
it is in or on which other samples have stopped, and the loop needs no host-device
synchronisation except at the (optional, periodic) batch compaction.

One step is one function, :func:`denoising_step`, of tensors only (the schedules are tables on
the device, indexed by step), so it can be compiled whole with ``torch.compile``
(``compile_mode``), network forward and sampling arithmetic together, and on CUDA replayed as one
CUDA graph (``compile_mode="reduce-overhead"``). The compiled step computes the same tokens as the
plain one (tests/test_bench.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from sundae.config import SamplingOptions
from sundae.errors import InputError

_MASK32 = 0xFFFFFFFF
_STREAM_INIT, _STREAM_DRAW, _STREAM_UPDATE = 1, 2, 3


@dataclass
class SampleOutput:
    tokens: Tensor  # (B, h, w) long
    steps_taken: Tensor  # (B,) long: the step (from 1) each sample stopped at; ``steps`` when it never stopped
    trajectory: list[Tensor] | None = None  # per step, (B, h, w) on CPU, when asked for
    forward_rows: list[int] = field(default_factory=list)  # samples in the forward batch at each step run


StepCallback = Callable[[int, Tensor, Tensor], None]  # (step, tokens (B, h, w), finished (B,) bool)


# --- counter-based random numbers ------------------------------------------------------------


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for int64 x < 2**32, split in 16-bit halves so nothing overflows int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer with full avalanche (Wellons' lowbias32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_host(x: int) -> int:
    """:func:`_hash32` of a Python int, computed on the host (bit-identical)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seed_keys(seeds: Tensor) -> Tensor:
    """Each sample's 32-bit hash key, from its 64-bit seed: computed once per sampling call."""
    seeds = seeds.to(torch.int64)
    return _hash32(_hash32(seeds & _MASK32) ^ (seeds >> 32))


def step_key(step: int, stream: int) -> int:
    """The key of one (step, stream) pair, hashed on the host: no device work, no sync."""
    return _hash32_host((step + 1) * 0x9E37 + stream * 0x85EB)


def position_hashes(numel: int, device: torch.device | str) -> Tensor:
    """The two hashes of every position index, (2, numel): step-independent, so computed once per call."""
    index = torch.arange(numel, device=device, dtype=torch.int64)
    return torch.stack((_hash32(index * 2), _hash32(index * 2 + 1)))


def uniform_from_keys(keys: Tensor, key_of_step: Tensor | int, hashes: Tensor) -> Tensor:
    """Uniform numbers in (0, 1) of shape (B, numel) from :func:`seed_keys`, :func:`step_key` and
    :func:`position_hashes`: 48 random bits per position, as a double strictly inside (0, 1)."""
    key = _hash32(keys ^ key_of_step)
    bits_a = _hash32(key[:, None] ^ hashes[0][None, :])
    bits_b = _hash32(bits_a ^ hashes[1][None, :])
    return ((bits_a >> 8).double() * 2.0**24 + (bits_b >> 8).double() + 0.5) / 2.0**48


def uniform_noise(seeds: Tensor, step: int, stream: int, shape: tuple[int, ...]) -> Tensor:
    """Uniform numbers in (0, 1) of shape (B, *shape), a pure function of (seed, step, stream, index)."""
    hashes = position_hashes(math.prod(shape), seeds.device)
    return uniform_from_keys(seed_keys(seeds), step_key(step, stream), hashes).view(seeds.shape[0], *shape)


def seeds_from_generator(count: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, 2**62, (count,), generator=generator, dtype=torch.int64)


# --- the loop --------------------------------------------------------------------------------


def filter_logits(logits: Tensor, *, top_k: int | None, top_p: float | None) -> Tensor:
    """Mask logits outside the top-k / nucleus top-p set with -inf (last axis)."""
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def categorical_from_uniform(logits: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw from softmax(logits) over the last axis, one uniform number per position.

    Needs one random number per position instead of one per vocabulary entry (Gumbel-max).
    """
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def _guided_logits(model: nn.Module, tokens: Tensor, labels: Tensor | None, null_class: int | None,
                   guidance_scale: float) -> Tensor:
    if labels is None or guidance_scale == 1.0:
        return model(tokens, labels).float()
    if guidance_scale == 0.0:
        return model(tokens, torch.full_like(labels, null_class)).float()
    both = model(torch.cat([tokens, tokens]), torch.cat([labels, torch.full_like(labels, null_class)])).float()
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def denoising_step(model: nn.Module, tokens: Tensor, labels: Tensor | None, keys: Tensor, hashes: Tensor,
                   step_keys: Tensor, temperature: Tensor, proportion: Tensor, frozen: Tensor, finished: Tensor, *,
                   null_class: int | None, guidance_scale: float, top_k: int | None,
                   top_p: float | None) -> tuple[Tensor, Tensor]:
    """One sampling step (paper §3.4): new tokens (B, h, w) and which unfinished samples it left
    unchanged although it updated at least one of their free positions (B,): the self-stop signal.

    Logits at ``temperature`` give a proposal per position (inverse-CDF draw on the stream
    ``step_keys[0]``); a ``proportion`` of the positions (stream ``step_keys[1]``) take it, except
    ``frozen`` positions and ``finished`` samples. A sample none of whose free positions was drawn
    for update is not "unchanged": the step could not have changed it (with a small free region,
    e.g. one inpainted token, that is most steps). Tensors only, so that it compiles into one graph.
    """
    logits = _guided_logits(model, tokens, labels, null_class, guidance_scale)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    proposal = categorical_from_uniform(logits, uniform_from_keys(keys, step_keys[0], hashes).view_as(tokens))
    update = uniform_from_keys(keys, step_keys[1], hashes).view_as(tokens) < proportion
    update &= ~frozen & ~finished[:, None, None]
    new_tokens = torch.where(update, proposal, tokens)
    # `update` excludes finished samples, so this is False for them too
    unchanged = update.flatten(1).any(dim=1) & (new_tokens == tokens).flatten(1).all(dim=1)
    return new_tokens, unchanged


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs (on CUDA)
_compiled_steps: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def step_function(compile_mode: str | None) -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`denoising_step`, or its ``torch.compile`` as one graph (``fullgraph``: a graph break would
    split the CUDA graph, so it is an error).

    ``"reduce-overhead"`` replays each step as one CUDA graph on CUDA: the step's few hundred kernel
    launches become one, which is what bounds small batches on a fast GPU; a graph is recorded per
    batch size met, kept few by the power-of-two buckets of :func:`rows_to_keep`. Shapes follow
    torch's automatic dynamic: the first batch size compiles static, and when compaction changes
    it one more compilation makes the batch axis dynamic (a batch of 1 is specialised once more).
    """
    if compile_mode is None:
        return denoising_step
    if compile_mode not in COMPILE_MODES:
        raise InputError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_mode not in _compiled_steps:
        _compiled_steps[compile_mode] = torch.compile(denoising_step, mode=compile_mode, fullgraph=True)
    return _compiled_steps[compile_mode]


def rows_to_keep(finished: Tensor, *, bucketed: bool) -> Tensor | None:
    """At a compaction, the rows to keep (active ones first), or None to keep them all (one host sync).

    ``bucketed`` (compiled steps) keeps a power-of-two number of rows, padding with finished
    samples, which stay frozen: a compiled step then sees at most log2(B) + 1 batch sizes.
    """
    size = finished.shape[0]
    active = int((~finished).sum())
    target = min(size, 1 << (active - 1).bit_length()) if bucketed and active else active
    if target == size:
        return None
    return torch.argsort(finished.to(torch.uint8), stable=True)[:target]


def _check_inputs(model: nn.Module, tokens: Tensor, labels: Tensor | None, keep_mask: Tensor | None,
                  codebook_size: int, num_classes: int | None) -> None:
    if tokens.dim() != 3:
        raise InputError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise InputError(f"tokens must lie in [0, {codebook_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    if keep_mask is not None and keep_mask.shape != tokens.shape:
        raise InputError(f"keep_mask shape {tuple(keep_mask.shape)} differs from tokens {tuple(tokens.shape)}")
    if labels is not None:
        if num_classes is None:
            raise InputError("class labels were given but the model is unconditional")
        if labels.shape != (tokens.shape[0],):
            raise InputError(f"class_labels must have shape ({tokens.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"class labels must lie in [0, {num_classes}), got {labels.tolist()}")


@torch.inference_mode()
def sample(
    model: nn.Module,
    *,
    options: SamplingOptions = SamplingOptions(),
    num_samples: int | None = None,
    grid_shape: tuple[int, int] | None = None,
    tokens: Tensor | None = None,
    randomize_mask: Tensor | None = None,
    keep_mask: Tensor | None = None,
    class_labels: Tensor | None = None,
    seeds: Tensor | list[int] | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    compile_mode: str | None = None,
) -> SampleOutput:
    """Draw token grids from a SUNDAE denoiser.

    Args:
        model: maps ``(tokens (B, h, w), class_labels (B,) | None)`` to logits ``(B, h, w, v)``; must
            expose ``config.codebook_size`` and ``config.num_classes``/``config.null_class``.
        options: steps, temperature and proportion schedules, top-k/p, guidance, self-stopping.
        num_samples, grid_shape: batch size and (h, w) when starting from noise (``tokens`` None).
        tokens: starting tokens (B, h, w); positions in ``randomize_mask`` are replaced by uniform
            random tokens first (default: all positions when ``tokens`` is None, none otherwise).
        keep_mask: (B, h, w) bool, True where tokens are known and must never change.
        class_labels: (B,) class indices for a class-conditional model.
        seeds: one integer seed per sample; sample ``i`` depends only on ``seeds[i]``. When None,
            seeds are drawn from ``generator`` (a ``torch.Generator``; None = the global RNG).
        callback: called after every step with (step, current tokens of the whole batch, finished).
        return_trajectory: keep a CPU copy of the tokens after every step.
        compile_mode: None (eager) or a ``torch.compile`` mode for the whole step (:func:`step_function`);
            ``"reduce-overhead"`` adds CUDA graphs on CUDA. Same tokens as eager; finished samples then
            leave in power-of-two buckets (:func:`rows_to_keep`).
    """
    config = model.config
    device = next(model.parameters()).device
    codebook_size, num_classes = config.codebook_size, config.num_classes
    if tokens is None:
        if num_samples is None or grid_shape is None:
            raise InputError("give either tokens or both num_samples and grid_shape")
        tokens = torch.zeros(num_samples, *grid_shape, dtype=torch.long, device=device)
        if randomize_mask is None:
            randomize_mask = torch.ones_like(tokens, dtype=torch.bool)
    tokens = tokens.to(device=device, dtype=torch.long)
    batch = tokens.shape[0]
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long, device=device)
    _check_inputs(model, tokens, labels, keep_mask, codebook_size, num_classes)
    if options.guidance_scale != 1.0 and labels is None and num_classes is not None:
        raise InputError("classifier-free guidance needs class_labels")

    if seeds is None:
        seeds = seeds_from_generator(batch, generator)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if seeds.shape != (batch,):
        raise InputError(f"need one seed per sample ({batch}), got {tuple(seeds.shape)}")
    step = step_function(compile_mode)
    keys = seed_keys(seeds.to(device))
    grid = tuple(tokens.shape[1:])
    hashes = position_hashes(math.prod(grid), device)

    if randomize_mask is not None:
        uniform = uniform_from_keys(keys, step_key(-1, _STREAM_INIT), hashes).view(batch, *grid)
        random_tokens = (uniform * codebook_size).long().clamp_(max=codebook_size - 1)
        tokens = torch.where(randomize_mask.to(device), random_tokens, tokens)
    frozen = torch.zeros_like(tokens, dtype=torch.bool) if keep_mask is None else keep_mask.to(device).bool()
    # the schedules as tables on the device: a step reads its row, no host-to-device copy per step
    temperatures = torch.tensor([options.temperature_at(i) for i in range(options.steps)], device=device)
    proportions = torch.tensor([options.proportion_at(i) for i in range(options.steps)], dtype=torch.float64,
                               device=device)
    step_keys = torch.tensor([[step_key(i, _STREAM_DRAW), step_key(i, _STREAM_UPDATE)] for i in range(options.steps)],
                             dtype=torch.int64, device=device)
    constants = {"null_class": config.null_class, "guidance_scale": options.guidance_scale, "top_k": options.top_k,
                 "top_p": options.top_p}
    graphed = compile_mode in CUDA_GRAPH_MODES

    final = tokens.clone()
    steps_taken = torch.full((batch,), options.steps, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # original index of each active row
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # per active row
    trajectory: list[Tensor] | None = [] if return_trajectory else None
    forward_rows: list[int] = []

    for index in range(options.steps):
        forward_rows.append(tokens.shape[0])
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        new_tokens, unchanged = step(model, tokens, labels, keys, hashes, step_keys[index], temperatures[index],
                                     proportions[index], frozen, finished, **constants)
        if graphed:  # a CUDA graph's outputs are overwritten by its next replay
            new_tokens, unchanged = new_tokens.clone(), unchanged.clone()
        if options.early_stop and index + 1 >= options.min_steps:  # step index + 1 is the step just run
            steps_taken[rows] = torch.where(unchanged, index + 1, steps_taken[rows])
            finished = finished | unchanged
        tokens = new_tokens

        if callback is not None or trajectory is not None:
            final[rows] = tokens
            if callback is not None:
                done = torch.ones(batch, dtype=torch.bool, device=device)
                done[rows] = finished
                callback(index, final, done)
            if trajectory is not None:
                trajectory.append(final.to("cpu", copy=True))
        if options.early_stop and (index + 1) % options.compaction_interval == 0:
            final[rows] = tokens
            keep = rows_to_keep(finished, bucketed=compile_mode is not None)
            if keep is not None:
                if keep.numel() == 0:
                    break
                tokens, rows, finished = tokens[keep], rows[keep], finished[keep]
                keys, frozen = keys[keep], frozen[keep]
                labels = None if labels is None else labels[keep]
    final[rows] = tokens
    return SampleOutput(tokens=final, steps_taken=steps_taken, trajectory=trajectory, forward_rows=forward_rows)
