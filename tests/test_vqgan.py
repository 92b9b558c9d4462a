"""VQ-GAN network: shapes at every downsampling factor, quantizer maths, fp32 under autocast,
attention equal to taming's formulation, and save/load round trips."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sundae.checkpoint import CONTENT_HASH_KEY, CheckpointError
from sundae.config import ConfigError, VQGANConfig
from sundae.tokenizer.vqgan import (
    VQGAN, AttnBlock, GumbelQuantizer, VectorQuantizer, codebook_statistics, decode_in_tiles,
)


def tiny_config(downsample_factor: int = 4, **changes) -> VQGANConfig:
    levels = int(math.log2(downsample_factor)) + 1
    fields = dict(
        resolution=max(32, downsample_factor), channels=32, channel_multipliers=(1,) * (levels - 1) + (2,),
        num_res_blocks=1, attention_resolutions=(max(32, downsample_factor) // downsample_factor,),
        z_channels=32, embed_dim=8, codebook_size=64,
    )
    return VQGANConfig(**{**fields, **changes})


def seeded_model(config: VQGANConfig, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(config).eval()


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize("factor", [4, 8, 16, 32])
def test_encode_decode_shapes_and_nearest_codes(factor: int) -> None:
    model = seeded_model(tiny_config(factor))
    height = max(16, factor)
    x = images(2, height, 2 * height)  # non-square
    indices = model.encode(x)
    assert indices.shape == (2, height // factor, 2 * height // factor) and indices.dtype == torch.long

    with torch.no_grad():
        z = model.encode_latents(x)
        brute_force = torch.cdist(
            z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), model.quantize.embedding.weight
        ).argmin(dim=1)
        assert torch.equal(indices.flatten(), brute_force)

        decoded = model.decode(indices)
        assert decoded.shape == x.shape
        codewords = model.quantize.embedding.weight[indices].permute(0, 3, 1, 2)
        torch.testing.assert_close(decoded, model.decode_codes(codewords))


def test_sides_not_multiple_of_factor_are_rejected() -> None:
    model = seeded_model(tiny_config(8))
    with pytest.raises(ValueError, match="not a multiple of .* f=8"):
        model.encode(images(1, 36, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 32, 32))


def test_group_norm_width_and_gumbel_width_are_validated() -> None:
    with pytest.raises(ConfigError, match="divisible by 32"):
        VQGAN(tiny_config(channels=16))
    with pytest.raises(ConfigError, match="embed_dim == z_channels"):
        VQGAN(tiny_config(quantizer="gumbel", embed_dim=8, z_channels=32))


def test_decode_rejects_bad_indices() -> None:
    model = seeded_model(tiny_config(4))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer indices"):
        model.decode(torch.zeros(1, 8, 8))


def test_forward_gives_finite_loss_and_gradients_everywhere() -> None:
    model = seeded_model(tiny_config(4)).train()
    x = images(2, 32, 32)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 8, 8)
    assert torch.isfinite(out.quantizer_loss)
    # the two VQ terms have the same value; legacy only moves where β's gradient goes
    z = model.encode_latents(x)
    z_q = model.quantize.embedding.weight[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantizer_loss, (1 + model.config.beta) * F.mse_loss(z, z_q))
    expected_perplexity, expected_usage = codebook_statistics(out.indices, 64)
    assert out.perplexity == expected_perplexity and out.codebook_usage == expected_usage

    (out.quantizer_loss + (out.reconstruction - x).abs().mean()).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight", "quant_conv.weight"):
        gradient = model.get_parameter(name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    assert model.last_layer is model.decoder.conv_out.weight


def test_codebook_statistics_closed_form() -> None:
    perplexity, usage = codebook_statistics(torch.tensor([[0, 0], [1, 1]]), 4)
    torch.testing.assert_close(perplexity, torch.tensor(2.0))
    torch.testing.assert_close(usage, torch.tensor(0.5))


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantizer_loss_placement_and_straight_through(legacy: bool) -> None:
    torch.manual_seed(0)
    beta = 0.25
    quantizer = VectorQuantizer(16, 4, beta=beta, legacy=legacy)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()
    z_q = quantizer.embedding.weight[out.indices].permute(0, 3, 1, 2).detach()
    n = z.numel()
    encoder_weight, codebook_weight = (1.0, beta) if legacy else (beta, 1.0)
    torch.testing.assert_close(z.grad, encoder_weight * 2 * (z - z_q).detach() / n)
    expected_codebook_grad = torch.zeros_like(quantizer.embedding.weight)
    expected_codebook_grad.index_add_(
        0, out.indices.flatten(), codebook_weight * 2 * (z_q - z.detach()).permute(0, 2, 3, 1).reshape(-1, 4) / n
    )
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected_codebook_grad)

    z.grad = None
    quantizer(z).quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through estimator


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_quantization_stays_fp32_under_autocast(quantizer: str) -> None:
    embed_dim = 32 if quantizer == "gumbel" else 8
    model = seeded_model(tiny_config(4, quantizer=quantizer, embed_dim=embed_dim))
    x = images(2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode_latents(x)
        assert z.dtype == torch.bfloat16
        quantized = model.quantize(z)
        out = model(x)
    assert quantized.quantized.dtype == torch.float32 and quantized.loss.dtype == torch.float32
    assert out.quantizer_loss.dtype == torch.float32
    assert torch.equal(quantized.indices, model.quantize.assign(z.float()))


def test_a_half_precision_model_decodes_in_its_own_dtype() -> None:
    model = seeded_model(tiny_config(4))
    indices = model.encode(images(1, 16, 16))
    with torch.no_grad():
        reference = model.decode(indices)
        decoded = model.to(torch.bfloat16).decode(indices)
    assert decoded.dtype == torch.bfloat16
    torch.testing.assert_close(decoded.float(), reference, atol=0.1, rtol=0.0)


def test_gumbel_quantizer_is_deterministic_in_eval_and_samples_in_training() -> None:
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(8, 16, 8, kl_weight=5e-4, temperature=1.0)
    z = torch.randn(2, 8, 4, 4) * 3
    logits = F.conv2d(z, quantizer.proj.weight, quantizer.proj.bias)
    quantizer.eval()
    out = quantizer(z)
    assert torch.equal(out.indices, logits.argmax(dim=1)) and torch.equal(quantizer.assign(z), out.indices)
    torch.testing.assert_close(out.quantized, quantizer.embed.weight[out.indices].permute(0, 3, 1, 2))
    q = logits.softmax(dim=1)
    torch.testing.assert_close(out.loss, 5e-4 * (q * torch.log(q * 16 + 1e-10)).sum(dim=1).mean())

    quantizer.train()
    z.requires_grad_(True)
    sampled = quantizer(z)
    assert not torch.equal(sampled.indices, out.indices)  # gumbel noise at temperature 1
    torch.testing.assert_close(sampled.quantized, quantizer.embed.weight[sampled.indices].permute(0, 3, 1, 2))
    (sampled.quantized.square().sum() + sampled.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_attention_equals_taming_bmm_formulation() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    b, c, height, width = q.shape
    weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    weights = weights.softmax(dim=2)
    attended = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    torch.testing.assert_close(block(x), x + block.proj_out(attended), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_save_and_load_give_identical_outputs(tmp_path, quantizer: str) -> None:
    embed_dim = 32 if quantizer == "gumbel" else 8
    model = seeded_model(tiny_config(8, quantizer=quantizer, embed_dim=embed_dim))
    model.save_pretrained(tmp_path / "vqgan")
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan").eval()
    assert loaded.config == model.config
    x = images(2, 32, 64)
    indices = model.encode(x)
    assert torch.equal(loaded.encode(x), indices)
    with torch.no_grad():
        assert torch.equal(loaded.decode(indices), model.decode(indices))


def test_weights_that_do_not_match_the_config_are_a_clear_error(tmp_path) -> None:
    directory = seeded_model(tiny_config(4)).save_pretrained(tmp_path / "vqgan")
    payload = json.loads((directory / "config.json").read_text())
    payload["config"]["codebook_size"] = 128
    (directory / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight: checkpoint \(64, 8\) vs model \(128, 8\)"):
        VQGAN.from_pretrained(directory)


def test_truncated_weights_are_a_clear_error(tmp_path) -> None:
    directory = seeded_model(tiny_config(4)).save_pretrained(tmp_path / "vqgan")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        VQGAN.from_pretrained(directory)


def test_a_flipped_bit_in_the_weights_is_caught_by_the_content_hash(tmp_path) -> None:
    model = seeded_model(tiny_config(4))
    directory = model.save_pretrained(tmp_path / "vqgan")
    weights = directory / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        assert len(handle.metadata()[CONTENT_HASH_KEY]) == 64  # sha256 hex
    original = weights.read_bytes()
    data_start = 8 + int.from_bytes(original[:8], "little")  # safetensors: header length, JSON header, data
    for offset in (data_start, data_start + (len(original) - data_start) // 2, len(original) - 1):
        flipped = bytearray(original)
        flipped[offset] ^= 0x10
        weights.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="is corrupted: content hash mismatch"):
            VQGAN.from_pretrained(directory)
    weights.write_bytes(original)
    x = images(1, 16, 16)
    assert torch.equal(VQGAN.from_pretrained(directory).eval().encode(x), model.encode(x))


def test_weights_saved_without_a_content_hash_still_load(tmp_path) -> None:
    """Older saves (and the shipped default model) have no hash in their metadata."""
    model = seeded_model(tiny_config(4))
    directory = model.save_pretrained(tmp_path / "vqgan")
    weights = directory / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # the same tensors, no metadata
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.metadata() is None
    x = images(1, 16, 16)
    assert torch.equal(VQGAN.from_pretrained(directory).eval().encode(x), model.encode(x))


class PatchDecoder:
    """A stand-in tokenizer whose every token decodes to its own f×f patch: tiling it is exact."""

    config = SimpleNamespace(downsample_factor=4)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens.float().repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
        return patches[:, None].expand(-1, 3, -1, -1)


def test_tiles_are_stitched_in_place():
    tokens = torch.randint(0, 100, (2, 7, 9))
    whole = PatchDecoder().decode(tokens)
    for tiles in (1, 2, 3, 7):
        assert torch.equal(decode_in_tiles(PatchDecoder(), tokens, tiles=tiles, overlap=2), whole)
    with pytest.raises(ValueError, match="decode tiles"):
        decode_in_tiles(PatchDecoder(), tokens, tiles=8)


def test_one_tile_is_plain_decoding():
    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16)).eval()
    tokens = torch.randint(0, 16, (2, 6, 8))
    with torch.inference_mode():
        assert torch.equal(decode_in_tiles(tokenizer, tokens, tiles=1), tokenizer.decode(tokens))
