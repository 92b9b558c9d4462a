"""The 2D-aware hourglass denoiser (paper §3.2): shapes, resampling blocks, rotary, conditioning, checkpoints."""

from __future__ import annotations

import pytest
import torch

from sundae.config import HOURGLASS_PRESETS, HourglassConfig
from sundae.denoiser.hourglass import (
    Blocks, Context, Downsample, Hourglass, Layout, count_parameters, describe, level_layouts,
)
from sundae.denoiser.rotary import Rotation, apply_rotary, rotary_angles
from sundae.sundae import sundae_loss

TINY = HOURGLASS_PRESETS["tiny"]
NESTED = HOURGLASS_PRESETS["tiny-nested"]
CONFIGS = {
    "tiny-2d": TINY,
    "nested-2d": NESTED,
    "tiny-1d": TINY.replace(resample="1d"),
    "nested-1d": NESTED.replace(resample="1d"),
    "flat": TINY.replace(depth=2),
    "nested-2d-k9": NESTED.replace(shorten_factor=9),
}


def build(config: HourglassConfig, seed: int = 0) -> Hourglass:
    torch.manual_seed(seed)
    return Hourglass(config).eval()


def random_tokens(config: HourglassConfig, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.codebook_size, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("grid", [(8, 8), (8, 12), (7, 9), (1, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_logits_have_one_row_per_token_and_are_finite(name: str, grid: tuple[int, int]) -> None:
    config = CONFIGS[name]
    logits = build(config)(random_tokens(config, (2, *grid)))
    assert logits.shape == (2, *grid, config.codebook_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # different inputs, different outputs


def test_rotary_positions_reach_the_model() -> None:
    # Without positions a transformer is permutation-equivariant; with 2D rotary it must not be.
    config = CONFIGS["flat"]
    model = build(config)
    tokens = random_tokens(config, (1, 4, 4))
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    permuted_tokens = tokens.reshape(1, 16)[:, permutation].reshape(1, 4, 4)
    permuted_logits = model(tokens).reshape(1, 16, -1)[:, permutation]
    assert not torch.allclose(model(permuted_tokens).reshape(1, 16, -1), permuted_logits, atol=1e-4)


def test_bad_tokens_are_rejected() -> None:
    model = build(TINY)
    with pytest.raises(ValueError, match="codebook size"):
        model(torch.full((1, 2, 2), TINY.codebook_size))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 2, 2))


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", ["2d", "1d"])
def test_one_backward_of_the_loss_reaches_every_parameter(resample: str) -> None:
    config = NESTED.replace(resample=resample, num_classes=3)
    model = build(config).train()
    tokens = random_tokens(config, (3, 6, 10))  # pads at both levels
    loss, _ = sundae_loss(model, tokens, class_labels=torch.tensor([0, 2, 3]),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    no_gradient = [name for name, parameter in model.named_parameters()
                   if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert no_gradient == []
    assert any("downsample.attention_layer.attention.to_query" in name for name, _ in model.named_parameters())


# --------------------------------------------------------------------------------------------
# rotary
# --------------------------------------------------------------------------------------------


def scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return query @ key.transpose(-1, -2)


def test_rotary_changes_the_scores_of_every_head_and_preserves_norms() -> None:
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 4, 6, 16, generator=generator)  # (B, heads, N, head_dim)
    positions = torch.randint(1, 8, (6, 2), generator=generator)
    angles = rotary_angles(positions, 16)
    rotation = Rotation.from_angles(angles)
    rotated_query, rotated_key = apply_rotary(query, rotation), apply_rotary(key, rotation)
    for head in range(4):
        assert not torch.allclose(scores(rotated_query, rotated_key)[:, head], scores(query, key)[:, head], atol=1e-3)
    torch.testing.assert_close(rotated_query.norm(dim=-1), query.norm(dim=-1))
    # the last rotation pairs belong to the column axis: moving along the column changes them
    moved = apply_rotary(query, Rotation.from_angles(rotary_angles(positions + torch.tensor([0, 1]), 16)))
    assert not torch.allclose(moved[..., 8:], rotated_query[..., 8:])
    torch.testing.assert_close(moved[..., :8], rotated_query[..., :8])


def test_rotary_turns_each_pair_by_its_angle() -> None:
    """(a, b) -> (a cos t - b sin t, a sin t + b cos t) for every pair, bit for bit."""
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    angles = torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) * 6
    rotated = apply_rotary(x, Rotation.from_angles(angles))
    a, b = x[..., 0::2], x[..., 1::2]
    assert torch.equal(rotated[..., 0::2], a * angles.cos() - b * angles.sin())
    assert torch.equal(rotated[..., 1::2], a * angles.sin() + b * angles.cos())


def pair_score(query: torch.Tensor, key: torch.Tensor, query_at: tuple[float, float],
               key_at: tuple[float, float]) -> torch.Tensor:
    positions = torch.tensor([query_at, key_at])
    angles = rotary_angles(positions, query.shape[-1])
    rotations = Rotation.from_angles(angles[:1]), Rotation.from_angles(angles[1:])
    return (apply_rotary(query, rotations[0]) * apply_rotary(key, rotations[1])).sum()


def test_rotary_scores_depend_only_on_the_2d_offset() -> None:
    query, key = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))
    offset = (2.0, -3.0)
    reference = pair_score(query, key, (0.0, 0.0), offset)
    for origin in [(5.0, 1.0), (-2.0, 7.5), (11.0, 11.0)]:
        shifted = pair_score(query, key, origin, (origin[0] + offset[0], origin[1] + offset[1]))
        torch.testing.assert_close(shifted, reference, atol=1e-4, rtol=1e-4)
    for other_offset in [(3.0, -3.0), (2.0, -2.0)]:  # one axis at a time
        assert not torch.allclose(pair_score(query, key, (0.0, 0.0), other_offset), reference, atol=1e-3)


def test_rotary_needs_head_dim_divisible_by_twice_the_axes() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        rotary_angles(torch.zeros(3, 2), 6)
    assert rotary_angles(torch.zeros(3, 1), 6).shape == (3, 3)


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [row for row in range(before.shape[1]) if not torch.allclose(before[0, row], after[0, row])]


@pytest.mark.parametrize(
    ("resample", "changed_token", "expected_rows"),
    [
        ("2d", (1, 0), [0]),  # row 1, column 0 lies in the top-left 2x2 block
        ("2d", (2, 3), [3]),  # bottom-right block
        ("1d", (1, 0), [1]),  # raster index 4: the second run of 4
        ("1d", (2, 3), [2]),  # raster index 11: the third run
    ],
)
def test_downsampling_merges_blocks_only(resample: str, changed_token: tuple[int, int],
                                         expected_rows: list[int]) -> None:
    config = TINY.replace(resample=resample)
    torch.manual_seed(0)
    downsample = Downsample(config).eval()
    blocks = Blocks(fine=Layout((4, 4)), shorten_factor=4, resample=resample)
    x = torch.randn(1, 16, config.dim)
    edited = x.clone()
    edited[0, changed_token[0] * 4 + changed_token[1]] += 1.0
    # the linear merge alone (Eq. 4 before A) ...
    assert changed_rows(downsample.merge(blocks.group(x)), downsample.merge(blocks.group(edited))) == expected_rows
    # ... and with the post-resampling attention, which stays inside the block
    assert changed_rows(downsample(x, blocks), downsample(edited, blocks)) == expected_rows


@pytest.mark.parametrize("resample", ["2d", "1d"])
@pytest.mark.parametrize("shape", [(7, 9), (8, 12), (1, 3), (5, 5)])
def test_grouping_pads_and_ungrouping_crops_back(resample: str, shape: tuple[int, int]) -> None:
    blocks = Blocks(fine=Layout(shape), shorten_factor=4, resample=resample)
    x = torch.randn(2, shape[0] * shape[1], 3)
    groups = blocks.group(x)
    assert groups.shape == (2, blocks.coarse.num_tokens, 4, 3)
    torch.testing.assert_close(blocks.ungroup(groups), x)
    mask = blocks.group_mask()
    real = shape[0] * shape[1]
    assert (mask is None) == (real % 4 == 0 and (resample == "1d" or (shape[0] % 2 == 0 and shape[1] % 2 == 0)))
    if mask is not None:
        assert int(mask.sum()) == real
        assert torch.all(groups[:, ~mask] == 0)


def test_padding_is_masked_out_of_the_downsampling_attention() -> None:
    config = TINY
    torch.manual_seed(0)
    downsample = Downsample(config).eval()
    blocks = Blocks(fine=Layout((3, 3)), shorten_factor=4, resample="2d")
    x = torch.randn(1, 9, config.dim)
    # top-right block: real tokens (0, 2) and (1, 2), two padded positions
    real = x[:, [2, 5]]
    merged = downsample.merge(blocks.group(x))[:, 1:2]  # (1, 1, dim)
    query_position = torch.tensor([[0.5, 2.5]])  # block centre in full-resolution units
    key_positions = torch.tensor([[0.5, 2.5], [0.0, 2.0], [1.0, 2.0]])
    expected = downsample.attention_layer(
        merged, Rotation.from_angles(rotary_angles(query_position, config.head_dim)),
        Context(torch.cat((merged, real), dim=1), Rotation.from_angles(rotary_angles(key_positions, config.head_dim)),
                None),
    )
    torch.testing.assert_close(downsample(x, blocks)[:, 1], expected[:, 0])


def test_shortened_tokens_sit_at_block_centres() -> None:
    blocks = Blocks(fine=Layout((4, 6)), shorten_factor=4, resample="2d")
    assert blocks.coarse == Layout((2, 3), stride=2)
    torch.testing.assert_close(blocks.coarse.positions()[:3], torch.tensor([[0.5, 0.5], [0.5, 2.5], [0.5, 4.5]]))
    runs = Blocks(fine=Layout((3, 3)), shorten_factor=4, resample="1d")
    torch.testing.assert_close(runs.coarse.positions(), torch.tensor([[1.5], [5.5], [9.5]]))


# --------------------------------------------------------------------------------------------
# class conditioning
# --------------------------------------------------------------------------------------------


def test_class_labels_condition_the_logits_and_none_means_null_class() -> None:
    config = TINY.replace(num_classes=3)
    model = build(config)
    tokens = random_tokens(config, (1, 8, 8)).expand(4, 8, 8)
    logits = model(tokens, torch.tensor([0, 1, 2, config.null_class]))
    for first in range(4):
        for second in range(first + 1, 4):
            assert not torch.allclose(logits[first], logits[second], atol=1e-4)
    torch.testing.assert_close(model(tokens), logits[3:].expand(4, -1, -1, -1))


def test_bad_class_labels_are_rejected() -> None:
    conditional = build(TINY.replace(num_classes=3))
    tokens = random_tokens(TINY, (2, 4, 4))
    for labels in (torch.tensor([0, 4]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"\[0, 3\]"):
            conditional(tokens, labels)
    with pytest.raises(ValueError, match="shape"):
        conditional(tokens, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):
        build(TINY)(tokens, torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# checkpoints and description
# --------------------------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(tmp_path) -> None:
    config = NESTED.replace(num_classes=3)
    model = build(config)
    tokens, labels = random_tokens(config, (2, 7, 9)), torch.tensor([1, 3])
    model.save_pretrained(tmp_path / "prior")
    loaded = Hourglass.from_pretrained(tmp_path / "prior").eval()
    assert loaded.config == config
    assert torch.equal(loaded(tokens, labels), model(tokens, labels))


def transformer_layer_parameters(dim: int, width: int, ff_multiplier: int) -> int:
    norms = 2 * 2 * dim
    attention = (dim * width + width) + (dim * 2 * width + 2 * width) + (width * dim + dim)
    feed_forward = (dim * ff_multiplier * dim + ff_multiplier * dim) + (ff_multiplier * dim * dim + dim)
    return norms + attention + feed_forward


def test_describe_counts_parameters_in_closed_form() -> None:
    d, v, k = TINY.dim, TINY.codebook_size, TINY.shorten_factor
    layer = transformer_layer_parameters(d, TINY.heads * TINY.head_dim, TINY.ff_multiplier)
    resampling = (k * d * d + d) + (d * k * d + k * d) + 2 * layer
    expected = v * d + 4 * layer + resampling + 2 * d + (d * v + v)  # depth (1, 2, 1)
    summary = describe(TINY)
    assert summary["parameters"] == expected == count_parameters(build(TINY))
    assert summary["layers"] == 4 and summary["levels"] == 1 and summary["resampling_layers"] == 2
    assert summary["tokens_per_level"] == [64, 16]
    assert describe(NESTED)["tokens_per_level"] == [64, 16, 4]


def test_describe_handles_paper_presets_and_uneven_grids() -> None:
    summary = describe(HOURGLASS_PRESETS["ffhq1024"])  # built on the meta device: allocates nothing
    assert summary["layers"] == 16 and summary["tokens_per_level"] == [1024, 256]
    assert summary["parameters"] > 100_000_000
    assert [layout.num_tokens for layout in level_layouts(NESTED, (7, 9))] == [63, 20, 6]
    assert [layout.num_tokens for layout in level_layouts(NESTED.replace(resample="1d"), (7, 9))] == [63, 16, 4]
