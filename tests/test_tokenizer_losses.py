"""VQ-GAN losses (Eq. 7): GAN losses, adaptive weight, step functions, PatchGAN, LPIPS-style distance."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sundae.checkpoint import CheckpointError
from sundae.config import ConfigError
from sundae.errors import InputError
from sundae.tokenizer import perceptual as perceptual_module
from sundae.tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from sundae.tokenizer.losses import (
    TokenizerLossConfig,
    adaptive_weight,
    adopt_weight,
    discriminator_loss,
    generator_adversarial_loss,
    generator_loss,
    hinge_discriminator_loss,
    vanilla_discriminator_loss,
)
from sundae.tokenizer.perceptual import PerceptualLoss

# torchvision's VGG16 `features` layout: a number is a 3x3 conv (+ ReLU), "M" a 2x2 max-pool.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_WIDTHS = [64, 128, 256, 512, 512]


# ------------------------------------------------------------------------------------------
# synthetic public-format weight files and an independent functional LPIPS
# ------------------------------------------------------------------------------------------


def _random_convolutions(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    convolutions, in_channels = [], 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            continue
        weight = torch.randn(entry, in_channels, 3, 3, generator=generator) * math.sqrt(2.0 / (9 * in_channels))
        convolutions.append((weight, 0.01 * torch.randn(entry, generator=generator)))
        in_channels = entry
    return convolutions


def _torchvision_keys() -> list[int]:
    """Index of each conv in torchvision's Sequential (conv, ReLU, ..., pool)."""
    indices, index = [], 0
    for entry in VGG16_LAYOUT:
        if entry != "M":
            indices.append(index)
            index += 1  # the ReLU
        index += 1
    return indices


def _stlpips_keys() -> list[str]:
    """ST-LPIPS' net.slice{s}.{i}: each pool is two modules (max-pool, blur); slices end after each tap's ReLU."""
    keys, index, slice_number = [], 0, 1
    for entry in VGG16_LAYOUT:
        if entry == "M":
            slice_number += 1
            index += 2
        else:
            keys.append(f"net.slice{slice_number}.{index}")
            index += 2
    return keys


def _stlpips_blur_keys() -> dict[str, int]:
    keys, index, slice_number, width = {}, 0, 1, 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            slice_number += 1
            keys[f"net.slice{slice_number}.{index + 1}.filt"] = width
            index += 2
        else:
            width = entry
            index += 2
    return keys


def _binomial_filter(channels: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    return kernel.repeat(channels, 1, 1, 1)


def _reference_taps(images: torch.Tensor, convolutions, *, blur: bool) -> list[torch.Tensor]:
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hidden, taps, weights = (images - shift) / scale, [], iter(convolutions)
    for entry in VGG16_LAYOUT:
        if entry == "M":
            taps.append(hidden)
            if blur:
                hidden = F.pad(F.max_pool2d(hidden, 2, stride=1), (2, 2, 2, 2), mode="reflect")
                hidden = F.conv2d(hidden, _binomial_filter(hidden.shape[1]), stride=2, groups=hidden.shape[1])
            else:
                hidden = F.max_pool2d(hidden, 2)
        else:
            weight, bias = next(weights)
            hidden = F.relu(F.conv2d(hidden, weight, bias, padding=1))
    return taps + [hidden]


def _reference_distance(first, second, convolutions, lins, *, blur: bool) -> torch.Tensor:
    total = torch.zeros(first.shape[0])
    for a, b, lin in zip(_reference_taps(first, convolutions, blur=blur),
                         _reference_taps(second, convolutions, blur=blur), lins):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total += ((a - b) ** 2 * lin.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
    return total


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("perceptual")
    convolutions = _random_convolutions(generator)
    lins = [torch.rand(1, width, 1, 1, generator=generator) for width in LPIPS_WIDTHS]
    lin_state = {f"lin{k}.model.1.weight": lin for k, lin in enumerate(lins)}

    torchvision_state = {}
    for index, (weight, bias) in zip(_torchvision_keys(), convolutions):
        torchvision_state[f"features.{index}.weight"] = weight
        torchvision_state[f"features.{index}.bias"] = bias
    torchvision_state["classifier.0.weight"] = torch.zeros(4, 4)  # the real file's classifier, shrunk: ignored
    torch.save(torchvision_state, folder / "vgg16-397923af.pth")
    torch.save(lin_state, folder / "vgg.pth")

    stlpips_state = {
        "scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
        "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
        **{key: _binomial_filter(width) for key, width in _stlpips_blur_keys().items()},
        **lin_state,
    }
    for key, (weight, bias) in zip(_stlpips_keys(), convolutions):
        stlpips_state[f"{key}.weight"] = weight
        stlpips_state[f"{key}.bias"] = bias
    torch.save(stlpips_state, folder / "vgg_shift_tolerant.pth")
    return {
        "folder": folder, "vgg": folder / "vgg16-397923af.pth", "lin": folder / "vgg.pth",
        "stlpips": folder / "vgg_shift_tolerant.pth", "stlpips_state": stlpips_state, "lin_state": lin_state,
        "convolutions": convolutions, "lins": lins,
    }


@pytest.fixture(scope="module")
def lpips(weight_files) -> PerceptualLoss:
    return PerceptualLoss.from_source("lpips-vgg", vgg_path=weight_files["vgg"], lin_path=weight_files["lin"])


def _images(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------
# GAN losses and weights
# ------------------------------------------------------------------------------------------


def test_hinge_discriminator_loss_matches_hand_computation():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2  -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2    -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


def test_vanilla_discriminator_loss_matches_hand_computation():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    expected = 0.5 * ((math.log(2) + math.log1p(math.exp(-2))) / 2 + (math.log(2) + math.log1p(math.exp(-1))) / 2)
    assert vanilla_discriminator_loss(real, fake).item() == pytest.approx(expected)


def test_generator_adversarial_loss_is_negative_mean_logit():
    assert generator_adversarial_loss(torch.tensor([[1.0, 3.0], [-2.0, 2.0]])).item() == pytest.approx(-1.0)


def test_adopt_weight_is_zero_before_start_and_weight_from_start_on():
    assert adopt_weight(0.5, 9, 10) == 0.0
    assert adopt_weight(0.5, 10, 10) == 0.5
    assert adopt_weight(0.5, 11, 10) == 0.5


def _linear_decoder_losses():
    generator = torch.Generator().manual_seed(1)
    decoder = nn.Linear(4, 3)
    latents, targets = torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator)
    critic = torch.randn(3, generator=generator)
    outputs = decoder(latents)
    return decoder, latents, targets, critic, outputs, (outputs - targets).abs().mean(), -(outputs @ critic).mean()


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    decoder, latents, targets, critic, outputs, reconstruction, adversarial = _linear_decoder_losses()
    weight = adaptive_weight(reconstruction, adversarial, decoder.weight)
    # y = W z + b, so dL/dW = (dL/dy)^T z
    reconstruction_gradient = (torch.sign(outputs - targets) / outputs.numel()).T @ latents
    adversarial_gradient = (-critic.expand(5, 3) / 5).T @ latents
    expected = reconstruction_gradient.norm() / (adversarial_gradient.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (reconstruction + weight * adversarial).backward()  # the graph was retained
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0


def test_adaptive_weight_is_clamped_to_max_weight():
    decoder, *_, reconstruction, adversarial = _linear_decoder_losses()
    assert adaptive_weight(reconstruction, 1e-9 * adversarial, decoder.weight, max_weight=10.0).item() == 10.0


def test_adaptive_weight_rejects_losses_that_do_not_reach_the_last_layer():
    decoder, *_, reconstruction, adversarial = _linear_decoder_losses()
    unrelated = (torch.randn(3, requires_grad=True) ** 2).sum()
    with pytest.raises(ValueError, match="generator_loss does not depend on last_layer"):
        adaptive_weight(reconstruction, unrelated, decoder.weight)
    with pytest.raises(ValueError, match="generator_loss carries no gradient"):
        adaptive_weight(reconstruction, adversarial.detach(), decoder.weight)


# ------------------------------------------------------------------------------------------
# generator / discriminator step functions
# ------------------------------------------------------------------------------------------


class CountingDiscriminator(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


LOSS_CONFIG = TokenizerLossConfig(l1_weight=2.0, perceptual_weight=0.5, codebook_weight=3.0, discriminator_weight=0.5,
                                  discriminator_start=10, perceptual="none")


def _generator_inputs():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, kernel_size=1)  # stands in for the decoder's final convolution
    latents = torch.randn(2, 4, 16, 16)
    images = _images(2, 3, 16, 16, seed=2)
    reconstructions = torch.tanh(last(latents))
    quantizer_loss = torch.tensor(0.25, requires_grad=True)
    discriminator = CountingDiscriminator(PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2)))
    return last, images, reconstructions, quantizer_loss, discriminator


def _expected_reconstruction(images, reconstructions, perceptual):
    return 2.0 * (images - reconstructions).abs().mean() + 0.5 * perceptual(images, reconstructions).mean()


def test_generator_loss_before_start_skips_the_discriminator(lpips):
    last, images, reconstructions, quantizer_loss, discriminator = _generator_inputs()
    loss, metrics = generator_loss(images=images, reconstructions=reconstructions, quantizer_loss=quantizer_loss,
                                   discriminator=discriminator, perceptual=lpips, last_layer=last.weight, step=9,
                                   config=LOSS_CONFIG)
    assert discriminator.calls == 0
    expected = _expected_reconstruction(images, reconstructions, lpips) + 3.0 * 0.25
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["perceptual"].item() > 0 and metrics["adversarial_weight"].item() == 0.0
    assert all(not value.requires_grad for value in metrics.values())


def test_generator_loss_after_start_adds_the_adaptively_weighted_adversarial_term(lpips):
    last, images, reconstructions, quantizer_loss, discriminator = _generator_inputs()
    loss, metrics = generator_loss(images=images, reconstructions=reconstructions, quantizer_loss=quantizer_loss,
                                   discriminator=discriminator, perceptual=lpips, last_layer=last.weight, step=10,
                                   config=LOSS_CONFIG)
    assert discriminator.calls == 1
    nll = _expected_reconstruction(images, reconstructions, lpips)
    adversarial = -discriminator.inner(reconstructions).mean()
    (nll_gradient,) = torch.autograd.grad(nll, last.weight, retain_graph=True)
    (adversarial_gradient,) = torch.autograd.grad(adversarial, last.weight, retain_graph=True)
    weight = 0.5 * nll_gradient.norm() / (adversarial_gradient.norm() + 1e-4)
    assert metrics["adversarial_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    assert metrics["adversarial"].item() == pytest.approx(adversarial.item(), rel=1e-5)
    assert abs((weight * adversarial).item()) > 1e-4  # the term is not negligible, so the check below bites
    assert loss.item() == pytest.approx((nll + 3.0 * 0.25 + weight * adversarial).item(), rel=1e-5)
    loss.backward()
    assert last.weight.grad.abs().sum() > 0 and quantizer_loss.grad.item() == pytest.approx(3.0)


def test_generator_loss_without_gradients_reports_but_does_not_add_the_adversarial_term(lpips):
    last, images, reconstructions, quantizer_loss, discriminator = _generator_inputs()
    with torch.no_grad():
        loss, metrics = generator_loss(images=images, reconstructions=reconstructions, quantizer_loss=quantizer_loss,
                                       discriminator=discriminator, perceptual=lpips, last_layer=last.weight,
                                       step=10, config=LOSS_CONFIG)
        expected = _expected_reconstruction(images, reconstructions, lpips) + 3.0 * 0.25
    assert discriminator.calls == 1 and metrics["adversarial"].item() != 0.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "kind, function", [("hinge", hinge_discriminator_loss), ("vanilla", vanilla_discriminator_loss)]
)
def test_discriminator_loss_trains_only_the_discriminator(kind, function):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2))
    images = _images(2, 3, 16, 16, seed=3)
    source = torch.randn(2, 3, 16, 16, requires_grad=True)
    config = LOSS_CONFIG.replace(discriminator_loss=kind)
    loss, metrics = discriminator_loss(images=images, reconstructions=torch.tanh(source), discriminator=discriminator,
                                       step=10, config=config)
    expected = function(discriminator(images), discriminator(torch.tanh(source)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert source.grad is None  # reconstructions were detached
    # (the last bias may get exactly 0 from the hinge: real and fake pull it equally hard)
    assert all(p.grad is not None for p in discriminator.parameters())
    assert all(p.grad.abs().sum() > 0 for name, p in discriminator.named_parameters() if name.endswith("weight"))
    assert set(metrics) == {"discriminator_loss", "logits_real", "logits_fake"}


def test_discriminator_loss_is_zero_before_start():
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2))
    images = _images(2, 3, 16, 16, seed=4)
    loss, _ = discriminator_loss(images=images, reconstructions=-images, discriminator=discriminator, step=9,
                                 config=LOSS_CONFIG)
    assert loss.item() == 0.0
    assert not LOSS_CONFIG.discriminator_active(9) and LOSS_CONFIG.discriminator_active(10)


def test_loss_config_defaults_are_table_4_and_bad_values_are_rejected():
    config = TokenizerLossConfig()
    assert (config.discriminator_weight, config.discriminator_start, config.codebook_weight) == (0.5, 15000, 1.0)
    with pytest.raises(ConfigError, match="discriminator_loss"):
        TokenizerLossConfig(discriminator_loss="wasserstein")
    with pytest.raises(ConfigError, match="needs perceptual_vgg_path"):
        TokenizerLossConfig(perceptual="lpips-vgg")
    with pytest.raises(ConfigError, match=">= 0"):
        TokenizerLossConfig(perceptual_weight=-1.0)


# ------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, logits", [(32, 2), (64, 6)])
def test_discriminator_output_is_one_logit_per_patch(size, logits):
    discriminator = PatchDiscriminator(DiscriminatorConfig())
    assert discriminator(torch.zeros(2, 3, size, size)).shape == (2, 1, logits, logits)


def test_discriminator_layout_and_initialisation_match_taming():
    torch.manual_seed(0)
    state = PatchDiscriminator(DiscriminatorConfig()).state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items() if key.endswith("weight")}
    assert shapes == {
        "main.0.weight": (64, 3, 4, 4), "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,),
        "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.8.weight": (512, 256, 4, 4),
        "main.9.weight": (512,), "main.11.weight": (1, 512, 4, 4),
    }
    assert {key for key in state if key.endswith(".bias")} == {
        "main.0.bias", "main.3.bias", "main.6.bias", "main.9.bias", "main.11.bias",
    }
    assert state["main.8.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert state["main.8.weight"].mean().abs().item() < 1e-3
    assert state["main.9.weight"].mean().item() == pytest.approx(1.0, abs=0.005)
    assert state["main.9.bias"].abs().sum().item() == 0.0


def test_discriminator_learns_to_separate_two_batches():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2))
    assert all(parameter.requires_grad for parameter in discriminator.parameters())
    real, fake = _images(2, 3, 16, 16, seed=5), _images(2, 3, 16, 16, seed=6) * 0.2
    losses = []
    for _ in range(10):  # plain SGD by hand: building a torch.optim optimizer first imports torch._dynamo (seconds)
        loss = hinge_discriminator_loss(discriminator(real), discriminator(fake))
        discriminator.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in discriminator.parameters():
                parameter -= 0.05 * parameter.grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_discriminator_rejects_bad_inputs_and_configs():
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8))
    with pytest.raises(ValueError, match=">= 24"):
        discriminator(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        discriminator(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="layers"):
        DiscriminatorConfig(layers=0)


def test_discriminator_save_and_load_give_identical_logits(tmp_path):
    discriminator = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2)).eval()
    images = _images(1, 3, 32, 32, seed=7)
    restored = PatchDiscriminator.from_pretrained(discriminator.save_pretrained(tmp_path / "d")).eval()
    assert torch.equal(discriminator(images), restored(images))


# ------------------------------------------------------------------------------------------
# perceptual distance
# ------------------------------------------------------------------------------------------


def test_lpips_vgg_matches_an_independent_functional_computation(lpips, weight_files):
    first, second = _images(2, 3, 32, 40, seed=8), _images(2, 3, 32, 40, seed=9)
    with torch.no_grad():
        ours = lpips(first, second)
        reference = _reference_distance(first, second, weight_files["convolutions"], weight_files["lins"], blur=False)
    assert lpips.source == "lpips-vgg" and ours.shape == (2,)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_stlpips_vgg_matches_an_independent_functional_computation(weight_files):
    stlpips = PerceptualLoss.from_source("stlpips-vgg", stlpips_path=weight_files["stlpips"])
    first, second = _images(2, 3, 37, 30, seed=10), _images(2, 3, 37, 30, seed=11)
    with torch.no_grad():
        ours = stlpips(first, second)
        reference = _reference_distance(first, second, weight_files["convolutions"], weight_files["lins"], blur=True)
    assert stlpips.source == "stlpips-vgg"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=">= 18"):
        stlpips(first[..., :16, :16], second[..., :16, :16])


def test_perceptual_distance_is_a_frozen_symmetric_distance(lpips):
    first = _images(2, 3, 16, 16, seed=12).requires_grad_(True)
    second = _images(2, 3, 16, 16, seed=13)
    assert torch.equal(lpips(second, second), torch.zeros(2))
    distance = lpips(first, second)
    assert (distance > 0).all()
    torch.testing.assert_close(distance, lpips(second, first))
    distance.sum().backward()
    assert first.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in lpips.parameters())
    assert set(lpips.state_dict()) == {f"features.stages.{s}.{i}.{p}" for s, n in enumerate([2, 2, 3, 3, 3])
                                        for i in range(n) for p in ("weight", "bias")} | {
        f"heads.{k}.weight" for k in range(5)}


def test_none_source_disables_the_term_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sundae.tokenizer.perceptual"):
        disabled = PerceptualLoss.from_source("none")
    assert disabled.source == "none" and "perceptual loss off" in caplog.text
    assert torch.equal(disabled(_images(3, 3, 8, 8, seed=14), _images(3, 3, 8, 8, seed=15)), torch.zeros(3))


def test_auto_source_prefers_lpips_files_then_stlpips_and_never_falls_back_to_none(weight_files, monkeypatch):
    monkeypatch.setattr(perceptual_module, "find_stlpips_weights", lambda: None)
    with pytest.raises(InputError, match="--perceptual none"):
        PerceptualLoss.from_source("auto")  # Eq. 7 is never silently reduced to L1 + GAN
    monkeypatch.setattr(perceptual_module, "find_stlpips_weights", lambda: weight_files["stlpips"])
    assert PerceptualLoss.from_source("auto").source == "stlpips-vgg"
    chosen = PerceptualLoss.from_source("auto", vgg_path=weight_files["vgg"], lin_path=weight_files["lin"])
    assert chosen.source == "lpips-vgg"


def test_stlpips_weights_are_found_inside_the_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "stlpips_pytorch"
    (package / "weights" / "vST0.0").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package code must not run')\n")
    (package / "weights" / "vST0.0" / "vgg_shift_tolerant.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stlpips_pytorch", raising=False)
    assert perceptual_module.find_stlpips_weights() == package / "weights" / "vST0.0" / "vgg_shift_tolerant.pth"
    assert "stlpips_pytorch" not in sys.modules
    monkeypatch.setattr(perceptual_module.importlib.util, "find_spec", lambda name: None)
    assert perceptual_module.find_stlpips_weights() is None


def _save(folder: Path, name: str, state) -> Path:
    torch.save(state, folder / name)
    return folder / name


def test_wrong_or_mismatched_weight_files_are_clear_errors(weight_files, tmp_path):
    vgg, lin = weight_files["vgg"], weight_files["lin"]
    with pytest.raises(CheckpointError, match="is not torchvision's vgg16"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=lin, lin_path=vgg)  # swapped
    wrong_width = dict(weight_files["lin_state"], **{"lin0.model.1.weight": torch.rand(1, 32, 1, 1)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=vgg, lin_path=_save(tmp_path, "narrow.pth", wrong_width))
    negative = dict(weight_files["lin_state"], **{"lin2.model.1.weight": -torch.rand(1, 256, 1, 1)})
    with pytest.raises(CheckpointError, match="non-negative"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=vgg, lin_path=_save(tmp_path, "negative.pth", negative))
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not be read"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=vgg, lin_path=tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=tmp_path / "absent.pth", lin_path=lin)
    with pytest.raises(ValueError, match="only one was given"):
        PerceptualLoss.from_source("lpips-vgg", vgg_path=vgg)
    other_blur = dict(weight_files["stlpips_state"], **{"net.slice2.5.filt": torch.full((64, 1, 3, 3), 1 / 9)})
    with pytest.raises(CheckpointError, match="net.slice2.5.filt differs"):
        PerceptualLoss.from_source("stlpips-vgg", stlpips_path=_save(tmp_path, "box.pth", other_blur))
