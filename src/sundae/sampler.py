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

:class:`SamplingRun` holds one call's state, like a diffusers scheduler: the schedule tables, set
up once on the device, the batch, and which samples have finished; :meth:`SamplingRun.step` runs
one step. :func:`sample` is the loop over it, with a per-step callback (which may stop sampling)
and the optional trajectory.

Randomness is counter-based: every random number is a hash of (sample seed, step, stream,
position) computed on the device. Hence a sample depends only on its own seed, never on the batch
it is in or on which other samples have stopped, and the loop needs no host-device
synchronisation except at the (optional, periodic) batch compaction. The numbers are 48-bit
integers, compared with integer thresholds or rounded once to float32, never float64, so the
sampler runs on devices without it (Apple MPS) and gives the same tokens everywhere.

One step is one function, :func:`denoising_step`, of tensors only (the schedules are tables on
the device, indexed by step), so it can be compiled whole with ``torch.compile``
(``compile_mode``), network forward and sampling arithmetic together, and on CUDA replayed as one
CUDA graph (``compile_mode="reduce-overhead"``). The compiled step computes the same tokens as the
plain one (tests/test_bench.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
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
    steps_taken: Tensor  # (B,) long: the step (from 1) each sample stopped at; the steps run when it never stopped
    trajectory: list[Tensor] | None = None  # per step, (B, h, w) on CPU, when asked for
    forward_rows: list[int] = field(default_factory=list)  # samples in the forward batch at each step run


# (step from 0, a copy of every sample's tokens (B, h, w), finished (B,) bool); returning False stops sampling
StepCallback = Callable[[int, Tensor, Tensor], "bool | None"]


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


UNIFORM_BITS = 48  # random bits per number: the uniform number of ``bits`` is (bits + 0.5) / 2**48


def uniform_bits(keys: Tensor, key_of_step: Tensor | int, hashes: Tensor) -> Tensor:
    """48 random bits per position, (B, numel) int64 in [0, 2**48), from :func:`seed_keys`,
    :func:`step_key` and :func:`position_hashes`; they stand for a uniform number strictly inside (0, 1)."""
    key = _hash32(keys ^ key_of_step)
    bits_a = _hash32(key[:, None] ^ hashes[0][None, :])
    bits_b = _hash32(bits_a ^ hashes[1][None, :])
    return (bits_a >> 8) << 24 | (bits_b >> 8)


def uniform_float(bits: Tensor) -> Tensor:
    """The uniform number of ``bits`` rounded to the nearest float32: the odd integer 2 * bits + 1
    (49 bits) is rounded once by the cast, and scaling by a power of two is exact."""
    return (2 * bits + 1).float() * 2.0 ** -(UNIFORM_BITS + 1)


def bits_below(probability: float) -> int:
    """How many values of 48 random bits stand for a uniform number below ``probability``, so that
    ``bits < bits_below(p)`` holds with probability p, decided exactly in integers."""
    return math.ceil(Fraction(probability) * 2**UNIFORM_BITS - Fraction(1, 2))


def uniform_index(bits: Tensor, size: int) -> Tensor:
    """floor(u * size) for the uniform number u of ``bits``, clamped to ``size - 1``, computed in integers
    and rounded as a float64 product would be (round to nearest), so tokens drawn before the sampler
    dropped float64 stay the same. ``size`` <= 2**24."""
    odd = 2 * bits + 1  # u = odd / 2**49
    high, low = odd >> 25, odd & (2**25 - 1)
    product_high, product_low = high * size, low * size  # odd * size = product_high * 2**25 + product_low
    rest = ((product_high & (2**24 - 1)) << 25) + product_low
    index = (product_high >> 24) + (rest >> 49)
    remainder = rest & (2**49 - 1)  # u * size = index + remainder / 2**49
    # float64 rounds up to index + 1 when it lies within half an ulp, 2**(floor(log2 index) - 53); in units of
    # 2**-49 that is the highest power of two in index >> 4 (index < 2**24: its float32 exponent is exact)
    half_ulp = ((index >> 4).float().view(torch.int32) & 0x7F800000).view(torch.float32).long()
    return (index + (2**49 - remainder <= half_ulp).long()).clamp_(max=size - 1)


def random_bits(seeds: Tensor, step: int, stream: int, shape: tuple[int, ...]) -> Tensor:
    """:func:`uniform_bits` of shape (B, *shape), a pure function of (seed, step, stream, index)."""
    hashes = position_hashes(math.prod(shape), seeds.device)
    return uniform_bits(seed_keys(seeds), step_key(step, stream), hashes).view(seeds.shape[0], *shape)


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


def guide(both: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance of logits computed for a batch and its null-class copy, stacked:
    uncond + g·(cond − uncond) in float32."""
    conditional, unconditional = both.float().chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _guided_logits(model: nn.Module, tokens: Tensor, labels: Tensor | None, null_class: int | None,
                   guidance_scale: float) -> Tensor:
    if labels is None or guidance_scale == 1.0:
        return model(tokens, labels).float()
    if guidance_scale == 0.0:
        return model(tokens, torch.full_like(labels, null_class)).float()
    both = model(torch.cat([tokens, tokens]), torch.cat([labels, torch.full_like(labels, null_class)]))
    return guide(both, guidance_scale)


def denoising_step(model: nn.Module, tokens: Tensor, labels: Tensor | None, keys: Tensor, hashes: Tensor,
                   step_keys: Tensor, temperature: Tensor, update_below: Tensor, frozen: Tensor, finished: Tensor, *,
                   null_class: int | None, guidance_scale: float, top_k: int | None,
                   top_p: float | None) -> tuple[Tensor, Tensor]:
    """One sampling step (paper §3.4): new tokens (B, h, w) and which unfinished samples it left
    unchanged although it updated at least one of their free positions (B,): the self-stop signal.

    Logits at ``temperature`` give a proposal per position (inverse-CDF draw on the stream
    ``step_keys[0]``); the positions whose bits on the stream ``step_keys[1]`` are below
    ``update_below`` (:func:`bits_below` of the proportion) take it, except ``frozen`` positions and
    ``finished`` samples. A sample none of whose free positions was drawn for update is not
    "unchanged": the step could not have changed it (with a small free region, e.g. one inpainted
    token, that is most steps). Tensors only, so that it compiles into one graph.
    """
    logits = _guided_logits(model, tokens, labels, null_class, guidance_scale)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    proposal = categorical_from_uniform(logits, uniform_float(uniform_bits(keys, step_keys[0], hashes)).view_as(tokens))
    update = uniform_bits(keys, step_keys[1], hashes).view_as(tokens) < update_below
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


def _check_inputs(tokens: Tensor, labels: Tensor | None, keep_mask: Tensor | None, seeds: Tensor,
                  codebook_size: int, num_classes: int | None) -> None:
    if tokens.dim() != 3:
        raise InputError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise InputError(f"tokens must lie in [0, {codebook_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    if keep_mask is not None and keep_mask.shape != tokens.shape:
        raise InputError(f"keep_mask shape {tuple(keep_mask.shape)} differs from tokens {tuple(tokens.shape)}")
    if seeds.shape != tokens.shape[:1]:
        raise InputError(f"need one seed per sample ({tokens.shape[0]}), got {tuple(seeds.shape)}")
    if labels is not None:
        if num_classes is None:
            raise InputError("class labels were given but the model is unconditional")
        if labels.shape != (tokens.shape[0],):
            raise InputError(f"class_labels must have shape ({tokens.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"class labels must lie in [0, {num_classes}), got {labels.tolist()}")


def schedule_tables(options: SamplingOptions, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per step, on the device (a step reads its row: no host-to-device copy per step): the temperature
    (steps,) float32, the update threshold (steps,) int64 (:func:`bits_below` of the proportion) and
    the keys of the draw and update streams (steps, 2) int64."""
    steps = range(options.steps)
    temperatures = torch.tensor([options.temperature_at(i) for i in steps], dtype=torch.float32, device=device)
    update_below = torch.tensor([bits_below(options.proportion_at(i)) for i in steps], dtype=torch.int64,
                                device=device)
    step_keys = torch.tensor([[step_key(i, _STREAM_DRAW), step_key(i, _STREAM_UPDATE)] for i in steps],
                             dtype=torch.int64, device=device)
    return temperatures, update_below, step_keys


class SamplingRun:
    """One sampling call, stepped by hand (:func:`sample` is the loop over it; its arguments are the same).

    The schedule tables and random keys are set up once; :meth:`step` runs one step on the samples
    still in the forward batch; with ``early_stop``, every ``compaction_interval`` steps the finished
    ones leave it (one host sync). :meth:`current_tokens` and :meth:`output` read the whole batch.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, *, options: SamplingOptions = SamplingOptions(),
                 num_samples: int | None = None, grid_shape: tuple[int, int] | None = None,
                 tokens: Tensor | None = None, randomize_mask: Tensor | None = None, keep_mask: Tensor | None = None,
                 class_labels: Tensor | None = None, seeds: Tensor | list[int] | None = None,
                 generator: torch.Generator | None = None, compile_mode: str | None = None) -> None:
        config, device = model.config, next(model.parameters()).device
        if tokens is None:
            if num_samples is None or grid_shape is None:
                raise InputError("give either tokens or both num_samples and grid_shape")
            tokens = torch.zeros(num_samples, *grid_shape, dtype=torch.long, device=device)
            randomize_mask = torch.ones_like(tokens, dtype=torch.bool) if randomize_mask is None else randomize_mask
        tokens = tokens.to(device=device, dtype=torch.long)
        labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long, device=device)
        seeds = seeds_from_generator(tokens.shape[0], generator) if seeds is None else seeds
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        _check_inputs(tokens, labels, keep_mask, seeds, config.codebook_size, config.num_classes)
        if options.guidance_scale != 1.0 and labels is None and config.num_classes is not None:
            raise InputError("classifier-free guidance needs class_labels")
        self.model, self.options, self.labels = model, options, labels
        self.keys = seed_keys(seeds.to(device))
        self.hashes = position_hashes(math.prod(tokens.shape[1:]), device)
        self.temperatures, self.update_below, self.step_keys = schedule_tables(options, device)
        self.constants = {"null_class": config.null_class, "guidance_scale": options.guidance_scale,
                          "top_k": options.top_k, "top_p": options.top_p}
        self.step_function, self.compile_mode = step_function(compile_mode), compile_mode
        if randomize_mask is not None:
            bits = uniform_bits(self.keys, step_key(-1, _STREAM_INIT), self.hashes).view_as(tokens)
            tokens = torch.where(randomize_mask.to(device), uniform_index(bits, config.codebook_size), tokens)
        self.frozen = torch.zeros_like(tokens, dtype=torch.bool) if keep_mask is None else keep_mask.to(device).bool()
        self.tokens = tokens  # the samples in the forward batch (active rows)
        self.final = tokens.clone()  # every sample's tokens, as of its last compaction
        self.rows = torch.arange(tokens.shape[0], device=device)  # original index of each active row
        self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)  # per active row
        self.steps_taken = torch.zeros(tokens.shape[0], dtype=torch.long, device=device)  # set when a sample stops
        self.steps_run = 0
        self.forward_rows: list[int] = []

    @property
    def done(self) -> bool:
        """Whether every step has run or every sample has left the forward batch."""
        return self.steps_run == self.options.steps or self.tokens.shape[0] == 0

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next step; then, at a compaction, remove finished samples from the forward batch."""
        options, graphed = self.options, self.compile_mode in CUDA_GRAPH_MODES
        index = self.steps_run
        self.forward_rows.append(self.tokens.shape[0])
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        new_tokens, unchanged = self.step_function(
            self.model, self.tokens, self.labels, self.keys, self.hashes, self.step_keys[index],
            self.temperatures[index], self.update_below[index], self.frozen, self.finished, **self.constants)
        if graphed:  # a CUDA graph's outputs are overwritten by its next replay
            new_tokens, unchanged = new_tokens.clone(), unchanged.clone()
        self.steps_run = index + 1
        if options.early_stop and self.steps_run >= options.min_steps:
            self.steps_taken[self.rows] = torch.where(unchanged, self.steps_run, self.steps_taken[self.rows])
            self.finished = self.finished | unchanged
        self.tokens = new_tokens
        if options.early_stop and self.steps_run % options.compaction_interval == 0:
            self._compact()

    def _compact(self) -> None:
        self.final[self.rows] = self.tokens
        keep = rows_to_keep(self.finished, bucketed=self.compile_mode is not None)
        if keep is not None:
            self.tokens, self.rows, self.finished = self.tokens[keep], self.rows[keep], self.finished[keep]
            self.keys, self.frozen = self.keys[keep], self.frozen[keep]
            self.labels = None if self.labels is None else self.labels[keep]

    def current_tokens(self) -> Tensor:
        """Every sample's tokens now (B, h, w), as a new tensor that later steps leave as it is."""
        return self.final.index_put((self.rows,), self.tokens)

    def finished_samples(self) -> Tensor:
        """(B,) bool: which samples have stopped on their own."""
        everyone = torch.ones(self.final.shape[0], dtype=torch.bool, device=self.final.device)
        return everyone.index_put((self.rows,), self.finished)

    def output(self, trajectory: list[Tensor] | None = None) -> SampleOutput:
        """The tokens and steps taken so far; a sample still running has taken every step run."""
        running = torch.where(self.finished, self.steps_taken[self.rows], self.steps_run)
        return SampleOutput(tokens=self.current_tokens(), steps_taken=self.steps_taken.index_put((self.rows,), running),
                            trajectory=trajectory, forward_rows=self.forward_rows)


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
        callback: called after every step with (step from 0, a copy of every sample's tokens,
            finished (B,) bool); returning ``False`` stops sampling there, and the samples are returned
            as they are (``steps_taken`` of a sample still running: the steps run).
        return_trajectory: keep a CPU copy of the tokens after every step.
        compile_mode: None (eager) or a ``torch.compile`` mode for the whole step (:func:`step_function`);
            ``"reduce-overhead"`` adds CUDA graphs on CUDA. Same tokens as eager; finished samples then
            leave in power-of-two buckets (:func:`rows_to_keep`).
    """
    run = SamplingRun(model, options=options, num_samples=num_samples, grid_shape=grid_shape, tokens=tokens,
                      randomize_mask=randomize_mask, keep_mask=keep_mask, class_labels=class_labels, seeds=seeds,
                      generator=generator, compile_mode=compile_mode)
    trajectory: list[Tensor] | None = [] if return_trajectory else None
    while not run.done:
        run.step()
        if callback is None and trajectory is None:
            continue
        current = run.current_tokens()
        if trajectory is not None:
            trajectory.append(current.to("cpu", copy=True))
        if callback is not None and callback(run.steps_run - 1, current, run.finished_samples()) is False:
            break
    return run.output(trajectory)
