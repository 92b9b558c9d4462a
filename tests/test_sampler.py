"""The sampling loop: determinism, per-sample seeds, self-stopping, batch shrinking, keep-masks,
schedules, classifier-free guidance (paper §3.4, §3.6), the step callback, and the integer random
numbers that replaced float64 without changing a token."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sundae.config import ConfigError, HOURGLASS_PRESETS
from sundae.denoiser import Hourglass
from sundae.sampler import (
    _STREAM_INIT, _STREAM_UPDATE, SamplingOptions, SamplingRun, bits_below, categorical_from_uniform, filter_logits,
    random_bits, rows_to_keep, sample, step_function, uniform_float, uniform_index,
)


class PeakedDenoiser(nn.Module):
    """Logits that prefer a fixed target token per position (plus a class offset), whatever the input.

    Rows of every forward call are recorded, so tests can see the batch shrink.
    """

    def __init__(self, codebook_size: int = 16, num_classes: int | None = None, sharpness: float = 8.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(codebook_size=codebook_size, num_classes=num_classes, null_class=num_classes)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.sharpness = sharpness
        self.rows: list[int] = []

    def forward(self, tokens, class_labels=None):
        self.rows.append(tokens.shape[0])
        b, h, w = tokens.shape
        target = (torch.arange(h * w).view(h, w) * 7) % self.config.codebook_size
        target = target.expand(b, h, w)
        if class_labels is not None:
            target = (target + class_labels.view(b, 1, 1)) % self.config.codebook_size
        return torch.nn.functional.one_hot(target, self.config.codebook_size).float() * self.sharpness + self.anchor


class EchoDenoiser(nn.Module):
    """Logits that peak at the current token: every update leaves a sample as it was."""

    def __init__(self, codebook_size: int = 16) -> None:
        super().__init__()
        self.config = SimpleNamespace(codebook_size=codebook_size, num_classes=None, null_class=None)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.rows: list[int] = []

    def forward(self, tokens, class_labels=None):
        self.rows.append(tokens.shape[0])
        return torch.nn.functional.one_hot(tokens, self.config.codebook_size).float() * 50.0 + self.anchor


def start_noise(seeds: list[int], grid: tuple[int, int], codebook_size: int) -> torch.Tensor:
    """The uniform tokens (B, h, w) the sampler draws for randomized positions (its init stream)."""
    return uniform_index(random_bits(torch.tensor(seeds), -1, _STREAM_INIT, grid), codebook_size)


def drawn_for_update(seeds: list[int], step_index: int, grid: tuple[int, int], proportion: float) -> torch.Tensor:
    """(B, h, w) bool: the positions that step ``step_index`` (from 0) draws for update (its update stream)."""
    return random_bits(torch.tensor(seeds), step_index, _STREAM_UPDATE, grid) < bits_below(proportion)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Hourglass(HOURGLASS_PRESETS["tiny"].replace(num_classes=3)).eval()


def test_seeded_sampling_is_deterministic(tiny_model):
    options = SamplingOptions(steps=6)
    first = sample(tiny_model, options=options, num_samples=3, grid_shape=(8, 8), seeds=[1, 2, 3])
    second = sample(tiny_model, options=options, num_samples=3, grid_shape=(8, 8), seeds=[1, 2, 3])
    assert torch.equal(first.tokens, second.tokens)
    other = sample(tiny_model, options=options, num_samples=3, grid_shape=(8, 8), seeds=[4, 5, 6])
    assert not torch.equal(first.tokens, other.tokens)


def test_generator_gives_reproducible_seeds(tiny_model):
    options = SamplingOptions(steps=3)
    runs = [sample(tiny_model, options=options, num_samples=2, grid_shape=(8, 8),
                   generator=torch.Generator().manual_seed(9)).tokens for _ in range(2)]
    assert torch.equal(*runs)


def test_a_sample_does_not_depend_on_its_batch(tiny_model):
    options = SamplingOptions(steps=8, proportion=0.6)
    labels = torch.tensor([0, 1, 2, 1])
    batch = sample(tiny_model, options=options, num_samples=4, grid_shape=(8, 8), seeds=[10, 11, 12, 13],
                   class_labels=labels)
    alone = sample(tiny_model, options=options, num_samples=1, grid_shape=(8, 8), seeds=[12],
                   class_labels=labels[2:3])
    assert torch.equal(batch.tokens[2], alone.tokens[0])
    assert batch.steps_taken[2] == alone.steps_taken[0]


def test_samples_stop_independently_and_match_the_full_trajectory():
    model = PeakedDenoiser(codebook_size=16)
    options = SamplingOptions(steps=12, proportion=0.3, temperature=0.2, end_temperature=0.2)
    seeds = list(range(8))
    stopped = sample(model, options=options, num_samples=8, grid_shape=(3, 3), seeds=seeds)
    full = sample(model, options=options.replace(early_stop=False), num_samples=8, grid_shape=(3, 3), seeds=seeds,
                  return_trajectory=True)
    assert len(set(stopped.steps_taken.tolist())) > 1, "samples should stop at different steps"
    noise = start_noise(seeds, (3, 3), 16)
    for i in range(8):
        taken = int(stopped.steps_taken[i])
        path = [noise[i]] + [full.trajectory[t][i] for t in range(options.steps)]  # path[t]: after step t
        # step t stops a sample when it updated some position of it and changed none
        updated = [drawn_for_update(seeds, t, (3, 3), 0.3)[i].any() for t in range(options.steps)]
        first_stop = next((t for t in range(1, options.steps + 1)
                           if updated[t - 1] and torch.equal(path[t], path[t - 1])), options.steps)
        assert taken == first_stop
        assert torch.equal(stopped.tokens[i], path[taken])


def test_a_one_token_inpaint_stops_only_after_a_step_that_updated_its_token():
    """With one free token most steps draw no free position; such a step changes nothing but must not stop
    the sample, or it would return its starting noise. The peaked model proposes the target token, so a
    sample takes it at its first update and stops at the update after (at the first if it started there)."""
    model = PeakedDenoiser(codebook_size=16, sharpness=50.0)
    count, grid, steps, proportion = 200, (3, 3), 10, 0.4
    seeds = list(range(100, 100 + count))
    keep = torch.ones(count, *grid, dtype=torch.bool)
    keep[:, 1, 2] = False
    result = sample(model, options=SamplingOptions(steps=steps, proportion=proportion, temperature=1.0,
                                                   end_temperature=1.0),
                    tokens=torch.zeros(count, *grid, dtype=torch.long), randomize_mask=~keep, keep_mask=keep,
                    seeds=seeds)
    target = (1 * 3 + 2) * 7 % 16
    noise = start_noise(seeds, grid, 16)[:, 1, 2]
    drawn = torch.stack([drawn_for_update(seeds, t, grid, proportion)[:, 1, 2] for t in range(steps)], dim=1)
    expected = []
    for i in range(count):
        draws = [t + 1 for t in range(steps) if drawn[i, t]]  # the steps that updated the free token
        needed = 1 if noise[i] == target else 2
        expected.append(draws[needed - 1] if len(draws) >= needed else steps)
    assert result.steps_taken.tolist() == expected
    updated = drawn.any(dim=1)
    assert (result.tokens[updated, 1, 2] == target).all()  # never the starting noise
    assert int((~drawn[:, 0] & (noise != target)).sum()) > 80  # the case that used to stop at step 1
    assert torch.equal(result.tokens[keep], torch.zeros(count, *grid, dtype=torch.long)[keep])


@pytest.mark.parametrize("min_steps, stop", [(0, 1), (1, 1), (2, 2), (3, 3), (5, 5), (8, 8), (12, 8)])
def test_min_steps_is_the_earliest_stop(min_steps, stop):
    """Every step leaves an echoing model's samples as they were, so each stops at its earliest step."""
    model = EchoDenoiser()
    result = sample(model, options=SamplingOptions(steps=8, proportion=1.0, min_steps=min_steps), num_samples=3,
                    grid_shape=(2, 2), seeds=[0, 1, 2])
    assert result.steps_taken.tolist() == [stop] * 3
    assert model.rows == [3] * stop


def test_finished_samples_leave_the_forward_batch():
    model = PeakedDenoiser(codebook_size=16, sharpness=50.0)
    options = SamplingOptions(steps=10, proportion=1.0, temperature=1.0, end_temperature=1.0)
    result = sample(model, options=options, num_samples=4, grid_shape=(2, 2), seeds=[1, 2, 3, 4])
    # step 1 sets every token to its target, step 2 changes nothing: all stop after 2 steps
    assert result.steps_taken.tolist() == [2, 2, 2, 2]
    assert model.rows == [4, 4]


def test_compaction_interval_does_not_change_results():
    options = SamplingOptions(steps=12, proportion=0.3, temperature=0.2, end_temperature=0.2)
    every_step = sample(PeakedDenoiser(), options=options, num_samples=6, grid_shape=(3, 3), seeds=list(range(6)))
    lazy_model = PeakedDenoiser()
    lazy = sample(lazy_model, options=options.replace(compaction_interval=5), num_samples=6, grid_shape=(3, 3),
                  seeds=list(range(6)))
    assert torch.equal(every_step.tokens, lazy.tokens)
    assert torch.equal(every_step.steps_taken, lazy.steps_taken)
    assert len(set(lazy_model.rows[:5])) == 1  # no compaction before step 5


class HostSyncCounter(TorchDispatchMode):
    """Counts the operators that read a tensor's value back to the host (a device sync on a GPU)."""

    SYNCING = {torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
               torch.ops.aten._local_scalar_dense.default}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCING
        return func(*args, **(kwargs or {}))


def count_host_syncs(steps: int, early_stop: bool) -> int:
    options = SamplingOptions(steps=steps, early_stop=early_stop, compaction_interval=5)
    with HostSyncCounter() as counter:
        result = sample(PeakedDenoiser(sharpness=0.5), options=options, num_samples=3, grid_shape=(4, 4),
                        seeds=[1, 2, 3])
    assert result.forward_rows == [3] * steps  # nothing stops: every step runs
    return counter.count


def test_the_loop_reads_nothing_back_to_the_host_except_at_compactions():
    assert count_host_syncs(10, early_stop=False) == count_host_syncs(40, early_stop=False)  # input checks only
    assert count_host_syncs(40, early_stop=True) - count_host_syncs(10, early_stop=True) == 6  # one per 5 steps


def test_one_step_and_no_early_stop(tiny_model):
    one = sample(tiny_model, options=SamplingOptions(steps=1), num_samples=2, grid_shape=(8, 8), seeds=[0, 1])
    assert one.steps_taken.tolist() == [1, 1]
    model = PeakedDenoiser(sharpness=50.0)
    full = sample(model, options=SamplingOptions(steps=5, early_stop=False), num_samples=2, grid_shape=(2, 2),
                  seeds=[0, 1])
    assert full.steps_taken.tolist() == [5, 5] and model.rows == [2] * 5


def test_keep_mask_never_changes_known_tokens(tiny_model):
    generator = torch.Generator().manual_seed(0)
    known = torch.randint(0, 64, (3, 8, 8), generator=generator)
    keep = torch.rand(3, 8, 8, generator=generator) < 0.5
    trajectory_check = []
    result = sample(tiny_model, options=SamplingOptions(steps=6, early_stop=False), tokens=known,
                    randomize_mask=~keep, keep_mask=keep, seeds=[1, 2, 3],
                    callback=lambda step, tokens, finished: trajectory_check.append(tokens.clone()))
    assert torch.equal(result.tokens[keep], known[keep])
    assert all(torch.equal(tokens[keep], known[keep]) for tokens in trajectory_check)
    assert not torch.equal(result.tokens[~keep], known[~keep])


def test_schedules_hit_their_end_values():
    options = SamplingOptions(steps=7, temperature=1.2, end_temperature=0.3, proportion=0.9, end_proportion=0.2,
                              temperature_schedule="cosine")
    assert options.temperature_at(0) == pytest.approx(1.2) and options.temperature_at(6) == pytest.approx(0.3)
    assert options.proportion_at(0) == pytest.approx(0.9) and options.proportion_at(6) == pytest.approx(0.2)
    assert options.temperature_at(3) == pytest.approx(0.75)  # cosine midpoint
    assert options.proportion_at(3) == pytest.approx(0.55)  # linear midpoint
    constant = SamplingOptions(steps=4, proportion=0.5)
    assert [constant.proportion_at(t) for t in range(4)] == [0.5] * 4
    assert SamplingOptions(steps=1, temperature=1.0, end_temperature=0.4).temperature_at(0) == pytest.approx(0.4)


def test_guidance_scale_zero_is_the_unconditional_path(tiny_model):
    options = SamplingOptions(steps=4)
    labels = torch.tensor([0, 2])
    guided = sample(tiny_model, options=options.replace(guidance_scale=0.0), num_samples=2, grid_shape=(8, 8),
                    seeds=[5, 6], class_labels=labels)
    null = torch.full((2,), tiny_model.config.null_class)
    unconditional = sample(tiny_model, options=options, num_samples=2, grid_shape=(8, 8), seeds=[5, 6],
                           class_labels=None)
    assert torch.equal(guided.tokens, unconditional.tokens)  # None labels = null class on a conditional model
    strong = sample(tiny_model, options=options.replace(guidance_scale=3.0), num_samples=2, grid_shape=(8, 8),
                    seeds=[5, 6], class_labels=labels)
    assert not torch.equal(strong.tokens, guided.tokens)
    assert null.tolist() == [3, 3]


def test_class_labels_steer_the_peaked_model():
    model = PeakedDenoiser(codebook_size=16, num_classes=4, sharpness=50.0)
    result = sample(model, options=SamplingOptions(steps=3, proportion=1.0), num_samples=2, grid_shape=(2, 2),
                    seeds=[0, 0], class_labels=torch.tensor([1, 3]))
    target = (torch.arange(4).view(2, 2) * 7) % 16
    assert torch.equal(result.tokens[0], (target + 1) % 16)
    assert torch.equal(result.tokens[1], (target + 3) % 16)


def test_noise_is_uniform_and_batch_independent():
    seeds = torch.tensor([3, 4, 5])
    noise = uniform_float(random_bits(seeds, step=2, stream=1, shape=(4000,)))
    assert noise.dtype == torch.float32 and 0 < float(noise.min()) and float(noise.max()) < 1
    assert abs(float(noise.mean()) - 0.5) < 0.02 and abs(float(noise.std()) - 12 ** -0.5) < 0.01
    assert torch.equal(random_bits(seeds[1:], 2, 1, (4000,)), random_bits(seeds, 2, 1, (4000,))[1:])
    assert not torch.equal(random_bits(seeds, 3, 1, (4000,)), random_bits(seeds, 2, 1, (4000,)))


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_equals_the_counter_hash_computed_in_plain_python():
    """The device computation (precomputed position hashes, 16-bit split multiplies) is the hash itself."""
    seeds = [7, 2**40 + 3, 2**62 - 1]
    bits = random_bits(torch.tensor(seeds), step=5, stream=2, shape=(3, 4))
    for row, seed in enumerate(seeds):
        key = _lowbias32(_lowbias32(seed & 0xFFFFFFFF) ^ (seed >> 32))
        key = _lowbias32(key ^ _lowbias32((5 + 1) * 0x9E37 + 2 * 0x85EB))
        for index in range(12):
            bits_a = _lowbias32(key ^ _lowbias32(2 * index))
            bits_b = _lowbias32(bits_a ^ _lowbias32(2 * index + 1))
            assert bits[row].flatten()[index].item() == (bits_a >> 8) * 2**24 + (bits_b >> 8)


def test_compaction_keeps_active_rows_first_and_buckets_to_powers_of_two():
    finished = torch.tensor([True, False, True, False, False, True, True])
    assert rows_to_keep(finished, bucketed=False).tolist() == [1, 3, 4]
    assert rows_to_keep(finished, bucketed=True).tolist() == [1, 3, 4, 0]  # 3 active -> 4 rows
    assert rows_to_keep(torch.tensor([False, False, True, True]), bucketed=True).tolist() == [0, 1]
    assert rows_to_keep(torch.tensor([False, True, False]), bucketed=True).tolist() == [0, 2]
    assert rows_to_keep(torch.tensor([False, True, False, False]), bucketed=True) is None  # 3 active -> all 4 rows
    assert rows_to_keep(torch.tensor([False, False]), bucketed=False) is None
    assert rows_to_keep(torch.tensor([True, True]), bucketed=True).numel() == 0


def test_unknown_compile_mode_is_rejected():
    with pytest.raises(ValueError, match="compile_mode"):
        step_function("fastest")


def test_inverse_cdf_draws_match_the_distribution():
    probabilities = torch.tensor([0.1, 0.6, 0.3])
    uniform = uniform_float(random_bits(torch.tensor([1]), 0, 0, (50_000,))[0])
    draws = categorical_from_uniform(probabilities.log().expand(50_000, 3), uniform)
    assert torch.allclose(torch.bincount(draws, minlength=3) / 50_000., probabilities, atol=0.01)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_k=None, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(temperature=0.0), dict(end_temperature=-1.0),
                                 dict(proportion=0.0), dict(proportion=1.5), dict(top_k=0), dict(top_p=0.0),
                                 dict(guidance_scale=-1.0), dict(temperature_schedule="exp")])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ConfigError):
        SamplingOptions(**bad)


def test_bad_inputs_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="range"):
        sample(tiny_model, tokens=torch.full((1, 8, 8), 64), seeds=[0])
    with pytest.raises(ValueError, match="class"):
        sample(tiny_model, num_samples=1, grid_shape=(8, 8), class_labels=torch.tensor([7]), seeds=[0])
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(tiny_model, num_samples=2, grid_shape=(8, 8), seeds=[0])
    unconditional = Hourglass(HOURGLASS_PRESETS["tiny"])
    with pytest.raises(ValueError, match="unconditional"):
        sample(unconditional, num_samples=1, grid_shape=(8, 8), class_labels=torch.tensor([0]), seeds=[0])


# --- unchanged by the move from float64 to integer random numbers ------------------------------


class MixingDenoiser(nn.Module):
    """Logits that favour a target token per position (and class) plus a pull from the neighbours'
    tokens, in exact float32 arithmetic: no weights to initialise, so recorded samples stay valid."""

    def __init__(self, codebook_size: int = 13, num_classes: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(codebook_size=codebook_size, num_classes=num_classes, null_class=num_classes)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, class_labels=None):
        size = self.config.codebook_size
        batch, height, width = tokens.shape
        label = torch.zeros(batch, dtype=torch.long) if class_labels is None else class_labels
        target = (torch.arange(height * width).view(1, height, width) * 7 + label.view(-1, 1, 1) * 4) % size
        context = tokens.roll(1, dims=2) + 2 * tokens.roll(1, dims=1)
        phase = (context[..., None] * 3 + torch.arange(size) * 5) % size
        peak = torch.nn.functional.one_hot(target, size).float() * 4.0
        return peak + phase.float() * (3.0 / size) + self.anchor


def recorded_cases() -> dict[str, dict]:
    keep = (torch.arange(12).view(3, 4) % 3 == 0).expand(3, 3, 4)
    known = (torch.arange(36).view(3, 3, 4) * 5) % 13
    refresh = ~keep & (torch.arange(12).view(3, 4) % 2 == 0)
    noise = {"num_samples": 3, "grid_shape": (3, 4)}
    return {
        "defaults": dict(options=SamplingOptions(steps=8), **noise),
        "schedules": dict(options=SamplingOptions(steps=10, proportion=0.5, end_proportion=0.9,
                                                  proportion_schedule="cosine", temperature_schedule="cosine",
                                                  top_k=5, min_steps=3, compaction_interval=3), **noise),
        "guidance": dict(options=SamplingOptions(steps=7, guidance_scale=2.5, top_p=0.8, early_stop=False),
                         class_labels=torch.tensor([0, 2, 1]), **noise),
        "inpaint": dict(options=SamplingOptions(steps=6, temperature=0.4, end_temperature=0.4), tokens=known,
                        keep_mask=keep, randomize_mask=~keep),
        "refine": dict(options=SamplingOptions(steps=6, proportion=0.3), tokens=known, keep_mask=keep,
                       randomize_mask=refresh, class_labels=torch.tensor([1, 1, 0])),
    }


# Tokens (base 13, flattened (3, 3, 4)) and steps taken, as the float64 sampler drew them for seeds
# [0, 7, 2**62 - 1]: recorded by running it before it was replaced.
RECORDED = {
    "defaults": ("0718293a4b580758293a4b5c0c18293a4b5c", [8, 8, 6]),
    "schedules": ("0718293a4b5c0718297a4c5c0718c93a4b5c", [7, 5, 10]),
    "guidance": ("0718293a4b5c8293a4b5c6074b5c60718293", [7, 7, 7]),
    "inpaint": ("0712294a465c871a29ca415c3715297a49bc", [3, 3, 4]),
    "refine": ("0b52604186938b1a67c1319b3a45227a89cc", [6, 4, 6]),
}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_samples_equal_those_of_the_float64_sampler(case):
    result = sample(MixingDenoiser(), seeds=[0, 7, 2**62 - 1], **recorded_cases()[case])
    digits, steps_taken = RECORDED[case]
    assert "".join("0123456789abc"[token] for token in result.tokens.flatten().tolist()) == digits
    assert result.steps_taken.tolist() == steps_taken


def float64_uniform(bits: torch.Tensor) -> torch.Tensor:
    """The uniform numbers as the float64 sampler computed them from the same 48 bits."""
    return ((bits >> 24).double() * 2.0**24 + (bits & 0xFFFFFF).double() + 0.5) / 2.0**48


def test_integer_random_numbers_equal_the_float64_arithmetic_they_replace():
    bits = torch.randint(0, 2**48, (200_000,), generator=torch.Generator().manual_seed(0))
    ties = torch.arange(2**23, 2**23 + 5000)  # 2 * bits + 1 has 25 bits: every float32 rounding is a tie
    for values in (bits, ties, torch.arange(2**48 - 100, 2**48)):
        assert torch.equal(uniform_float(values), float64_uniform(values).float())
    for probability in (0.8, 0.3, 1 / 3, 0.55, 1.0, 2.0**-40):
        threshold = bits_below(probability)
        near = torch.arange(max(threshold - 20, 0), min(threshold + 20, 2**48))
        for values in (bits, near):
            assert torch.equal(values < threshold, float64_uniform(values) < probability), probability
    rounded_up = 0
    for size in (13, 1000, 16384, 2**24 - 3):
        # bits whose u * size falls just below an integer, where the float64 product may round up to it
        edges = [(((target + 1) << 49) // size + offset - 1) // 2 for target in range(max(size - 200, 0), size)
                 for offset in (-2, -1, 0, 1)]
        edges = [value for value in edges if 0 <= value < 2**48]
        for values in (bits, torch.tensor(edges)):
            expected = (float64_uniform(values) * size).long().clamp(max=size - 1)
            assert torch.equal(uniform_index(values, size), expected), size
            exact = [min((2 * value + 1) * size >> 49, size - 1) for value in values.tolist()]
            rounded_up += sum(e != x for e, x in zip(exact, expected.tolist()))
    assert rounded_up > 0  # the emulated float64 rounding was exercised


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        results = result if isinstance(result, (tuple, list)) else [result]
        self.dtypes |= {tensor.dtype for tensor in results if isinstance(tensor, torch.Tensor)}
        return result


def test_sampling_creates_no_float64_tensor(tiny_model):
    known = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    options = SamplingOptions(steps=4, proportion=0.7, end_proportion=0.3, top_k=20, top_p=0.9, guidance_scale=2.0)
    with DtypeRecorder() as recorder:
        sample(tiny_model, options=options, tokens=known, keep_mask=keep, randomize_mask=~keep, seeds=[3, 2**62 - 5],
               class_labels=torch.tensor([0, 2]), return_trajectory=True, callback=lambda *_: None)
        sample(tiny_model, options=options, num_samples=2, grid_shape=(8, 8), class_labels=torch.tensor([1, 1]))
    assert torch.float32 in recorder.dtypes and torch.float64 not in recorder.dtypes


# --- the run object and the step callback -------------------------------------------------------------


def test_a_run_stepped_by_hand_equals_sample():
    model, options = MixingDenoiser(), SamplingOptions(steps=9, proportion=0.4, compaction_interval=2)
    expected = sample(model, options=options, num_samples=4, grid_shape=(3, 4), seeds=[1, 2, 3, 4],
                      return_trajectory=True)
    run = SamplingRun(model, options=options, num_samples=4, grid_shape=(3, 4), seeds=[1, 2, 3, 4])
    frames = []
    while not run.done:
        run.step()
        frames.append(run.current_tokens())
    output = run.output()
    assert torch.equal(output.tokens, expected.tokens) and torch.equal(output.steps_taken, expected.steps_taken)
    assert all(map(torch.equal, frames, expected.trajectory)) and len(frames) == len(expected.trajectory)
    assert run.finished_samples().tolist() == (expected.steps_taken < options.steps).tolist()


def test_callback_frames_are_copies_of_the_tokens_at_each_step():
    frames = []
    result = sample(MixingDenoiser(), options=SamplingOptions(steps=6, proportion=0.5, early_stop=False),
                    num_samples=2, grid_shape=(3, 4), seeds=[5, 6], return_trajectory=True,
                    callback=lambda step, tokens, finished: frames.append(tokens))  # kept as given, no clone
    assert len(frames) == 6 and all(map(torch.equal, frames, result.trajectory))
    changed = [not torch.equal(before, after) for before, after in zip(result.trajectory, result.trajectory[1:])]
    assert sum(changed) >= 3  # the frames differ where the tokens changed: they are not one live buffer
    assert len({frame.data_ptr() for frame in frames}) == len(frames)


def test_a_callback_returning_false_stops_sampling_with_the_steps_taken_so_far():
    model = MixingDenoiser()
    options = SamplingOptions(steps=12, proportion=0.5, temperature=0.5, end_temperature=0.5)
    seeds = list(range(20, 28))
    full = sample(model, options=options, num_samples=8, grid_shape=(3, 4), seeds=seeds, return_trajectory=True)
    calls = []
    stopped = sample(model, options=options, num_samples=8, grid_shape=(3, 4), seeds=seeds,
                     callback=lambda step, tokens, finished: calls.append(step) or step < 3)
    assert calls == [0, 1, 2, 3]  # stopped after step 4
    assert torch.equal(stopped.tokens, full.trajectory[3])
    assert stopped.steps_taken.tolist() == full.steps_taken.clamp(max=4).tolist()
    assert 0 < int((full.steps_taken <= 4).sum()) < 8  # some had stopped on their own, some were still running
