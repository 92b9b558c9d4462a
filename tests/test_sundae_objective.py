"""The SUNDAE process (paper §3.3): corruption (Eq. 5), unrolling, and the unrolled loss (Eq. 6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sundae.config import HOURGLASS_PRESETS
from sundae.denoiser.hourglass import Hourglass
from sundae.sundae import corrupt, sample_categorical, sundae_loss, unroll

TINY = HOURGLASS_PRESETS["tiny"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------


def test_fixed_threshold_corrupts_that_fraction_of_tokens() -> None:
    codebook_size = 16
    tokens = torch.randint(0, codebook_size, (64, 32, 32), generator=seeded(0))
    corrupted, mask = corrupt(tokens, codebook_size, generator=seeded(1), threshold=0.3)
    assert abs(mask.float().mean().item() - 0.3) < 0.01  # 65536 tokens: std 0.002
    # a uniform replacement keeps the original code with probability 1 / codebook_size
    changed = (corrupted != tokens).float().mean().item()
    assert abs(changed - 0.3 * (1 - 1 / codebook_size)) < 0.01
    assert torch.equal(corrupted[~mask], tokens[~mask])


def test_replacements_are_uniform_over_the_codebook() -> None:
    tokens = torch.zeros(64, 32, 32, dtype=torch.long)
    corrupted, mask = corrupt(tokens, 16, generator=seeded(2), threshold=1.0)
    assert bool(mask.all())
    frequencies = torch.bincount(corrupted.flatten(), minlength=16).float() / corrupted.numel()
    torch.testing.assert_close(frequencies, torch.full((16,), 1 / 16), atol=0.004, rtol=0)


def test_threshold_is_drawn_per_sample_uniformly() -> None:
    tokens = torch.zeros(4000, 1, 16, dtype=torch.long)
    _, mask = corrupt(tokens, 8, generator=seeded(3))
    per_sample = mask.float().mean(dim=(1, 2))
    assert abs(per_sample.mean().item() - 0.5) < 0.02
    assert per_sample.std().item() > 0.25  # U[0, 1] has std 0.29; one shared t would give ~0.12
    _, mask = corrupt(torch.zeros(3, 32, 32, dtype=torch.long), 8, generator=seeded(4),
                      threshold=torch.tensor([0.0, 0.5, 1.0]))
    assert not mask[0].any() and mask[2].all() and abs(mask[1].float().mean().item() - 0.5) < 0.05


def test_corruption_is_deterministic_given_the_generator() -> None:
    tokens = torch.randint(0, 8, (4, 5, 5), generator=seeded(0))
    first, second, other = (corrupt(tokens, 8, generator=seeded(seed))[0] for seed in (7, 7, 8))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_bad_threshold_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        corrupt(torch.zeros(2, 3, 3, dtype=torch.long), 4, threshold=torch.tensor([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------------------------
# categorical sampling
# --------------------------------------------------------------------------------------------


def test_gumbel_max_sampling_matches_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(50_000, 4)
    samples = sample_categorical(logits, generator=seeded(0))
    frequencies = torch.bincount(samples, minlength=4).float() / samples.numel()
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], dim=0), atol=0.01, rtol=0)
    assert torch.equal(samples, sample_categorical(logits, generator=seeded(0)))


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


class TableDenoiser(nn.Module):
    """Logits of each position = a fixed row of a table, chosen by the token at that position."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[tokens]


# row a puts almost all mass on (a + 1) % 3, so a sampled step moves every token by one
TABLE = [[0.5, 20.0, -1.0], [-2.0, 0.0, 20.0], [20.0, 1.5, 0.25]]


def cross_entropy_by_hand(inputs: list[int], targets: list[int]) -> float:
    total = 0.0
    for token, target in zip(inputs, targets):
        row = TABLE[token]
        total += math.log(sum(math.exp(value) for value in row)) - row[target]
    return total / len(targets)


def test_loss_equals_the_mean_of_the_hand_computed_step_cross_entropies() -> None:
    tokens = torch.tensor([[[0, 1, 2, 0], [2, 0, 1, 1]]])
    model = TableDenoiser(torch.tensor(TABLE))
    loss, metrics = sundae_loss(model, tokens, unroll_steps=2, generator=seeded(0), codebook_size=3)

    # sundae_loss draws the corruption first from the same generator
    corrupted, mask = corrupt(tokens, 3, generator=seeded(0))
    assert not torch.equal(corrupted, tokens)  # the case exercises the corruption
    step_1_inputs = corrupted.flatten().tolist()
    step_2_inputs = [(token + 1) % 3 for token in step_1_inputs]  # the (near-certain) sample of step 1
    targets = tokens.flatten().tolist()
    ce_1 = cross_entropy_by_hand(step_1_inputs, targets)
    ce_2 = cross_entropy_by_hand(step_2_inputs, targets)

    assert math.isclose(metrics["ce_step1"].item(), ce_1, rel_tol=1e-5)
    assert math.isclose(metrics["ce_step2"].item(), ce_2, rel_tol=1e-5)
    assert math.isclose(loss.item(), (ce_1 + ce_2) / 2, rel_tol=1e-5)
    accuracy_2 = sum((token + 1) % 3 == target for token, target in zip(step_2_inputs, targets)) / len(targets)
    assert math.isclose(metrics["acc_step2"].item(), accuracy_2)
    assert math.isclose(metrics["corruption_rate"].item(), mask.float().mean().item())


def test_metrics_are_detached_per_step_tensors() -> None:
    torch.manual_seed(0)
    model = Hourglass(TINY)
    tokens = torch.randint(0, TINY.codebook_size, (2, 8, 8), generator=seeded(0))
    loss, metrics = sundae_loss(model, tokens, unroll_steps=3, generator=seeded(1))
    assert set(metrics) == {"corruption_rate"} | {f"{kind}_step{i}" for kind in ("ce", "acc") for i in (1, 2, 3)}
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), torch.stack([metrics[f"ce_step{i}"] for i in (1, 2, 3)]).mean())
    # an untrained model is near-uniform: cross-entropy close to log(codebook_size)
    assert abs(metrics["ce_step1"].item() - math.log(TINY.codebook_size)) < 0.5


def test_unrolled_steps_are_not_connected_by_gradients() -> None:
    torch.manual_seed(0)
    model = Hourglass(TINY)
    tokens = torch.randint(0, TINY.codebook_size, (2, 8, 8), generator=seeded(0))
    first, second = unroll(model, tokens, 2, generator=seeded(1))
    assert first.requires_grad and second.requires_grad
    assert torch.autograd.grad(second.sum(), first, allow_unused=True) == (None,)
    weight_gradient, = torch.autograd.grad(second.sum(), model.token_embedding.weight)
    assert weight_gradient.abs().sum() > 0


def test_same_seed_same_loss_and_labels_are_used() -> None:
    config = TINY.replace(num_classes=3)
    torch.manual_seed(0)
    model = Hourglass(config)
    tokens = torch.randint(0, config.codebook_size, (2, 8, 8), generator=seeded(0))
    labels = torch.tensor([0, 2])
    first, _ = sundae_loss(model, tokens, class_labels=labels, generator=seeded(5))
    again, _ = sundae_loss(model, tokens, class_labels=labels, generator=seeded(5))
    other_seed, _ = sundae_loss(model, tokens, class_labels=labels, generator=seeded(6))
    null_class, _ = sundae_loss(model, tokens, generator=seeded(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert not torch.equal(first, null_class)


def test_bad_arguments_are_rejected() -> None:
    tokens = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="codebook_size="):
        sundae_loss(TableDenoiser(torch.tensor(TABLE)), tokens)
    with pytest.raises(ValueError, match="at least one step"):
        unroll(TableDenoiser(torch.tensor(TABLE)), tokens, 0)
