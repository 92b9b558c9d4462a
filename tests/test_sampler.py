"""The sampling loop: determinism, per-sample seeds, self-stopping, batch shrinking, keep-masks,
schedules and classifier-free guidance (paper §3.4, §3.6)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sundae.config import ConfigError, HOURGLASS_PRESETS
from sundae.denoiser import Hourglass
from sundae.sampler import (
    _STREAM_INIT, _STREAM_UPDATE, SamplingOptions, categorical_from_uniform, filter_logits, rows_to_keep, sample,
    step_function, uniform_noise,
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
    uniform = uniform_noise(torch.tensor(seeds), -1, _STREAM_INIT, grid)
    return (uniform * codebook_size).long().clamp(max=codebook_size - 1)


def drawn_for_update(seeds: list[int], step_index: int, grid: tuple[int, int], proportion: float) -> torch.Tensor:
    """(B, h, w) bool: the positions that step ``step_index`` (from 0) draws for update (its update stream)."""
    return uniform_noise(torch.tensor(seeds), step_index, _STREAM_UPDATE, grid) < proportion


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
    noise = uniform_noise(seeds, step=2, stream=1, shape=(4000,))
    assert 0 < float(noise.min()) and float(noise.max()) < 1
    assert abs(float(noise.mean()) - 0.5) < 0.02 and abs(float(noise.std()) - 12 ** -0.5) < 0.01
    assert torch.equal(uniform_noise(seeds[1:], 2, 1, (4000,)), noise[1:])
    assert not torch.equal(uniform_noise(seeds, 3, 1, (4000,)), noise)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_equals_the_counter_hash_computed_in_plain_python():
    """The device computation (precomputed position hashes, 16-bit split multiplies) is the hash itself."""
    seeds = [7, 2**40 + 3, 2**62 - 1]
    noise = uniform_noise(torch.tensor(seeds), step=5, stream=2, shape=(3, 4))
    for row, seed in enumerate(seeds):
        key = _lowbias32(_lowbias32(seed & 0xFFFFFFFF) ^ (seed >> 32))
        key = _lowbias32(key ^ _lowbias32((5 + 1) * 0x9E37 + 2 * 0x85EB))
        for index in range(12):
            bits_a = _lowbias32(key ^ _lowbias32(2 * index))
            bits_b = _lowbias32(bits_a ^ _lowbias32(2 * index + 1))
            expected = ((bits_a >> 8) * 2**24 + (bits_b >> 8) + 0.5) / 2**48
            assert noise[row].flatten()[index].item() == expected


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
    uniform = uniform_noise(torch.tensor([1]), 0, 0, (50_000,))[0]
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
