"""How models run: bf16 Linear weights cast once give exactly what autocast computes every call."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sundae.config import HOURGLASS_PRESETS
from sundae.denoiser import Hourglass
from sundae.runtime import autocast, cast_linear_weights, resolve_precision


def tiny_prior() -> Hourglass:
    torch.manual_seed(0)
    return Hourglass(HOURGLASS_PRESETS["tiny"].replace(num_classes=3)).eval()


def casts_during(function) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::_to_copy")


def test_linear_weights_cast_once_give_the_autocast_logits_bit_for_bit():
    tokens = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    reference, cast = tiny_prior(), cast_linear_weights(tiny_prior(), torch.bfloat16)
    cpu = torch.device("cpu")
    with torch.inference_mode(), autocast(cpu, torch.bfloat16):
        expected = reference(tokens, labels)
        logits = cast(tokens, labels)
        assert torch.equal(logits, expected)
        # autocast re-casts fp32 weights at every call under inference_mode; cast weights need no casts
        linear_layers = sum(isinstance(module, torch.nn.Linear) for module in reference.modules())
        assert casts_during(lambda: reference(tokens, labels)) >= 2 * linear_layers
        reference_casts = casts_during(lambda: reference(tokens, labels))
        assert casts_during(lambda: cast(tokens, labels)) < reference_casts - linear_layers
    assert cast.token_embedding.weight.dtype == torch.float32 and cast.to_logits.weight.dtype == torch.bfloat16
    assert cast_linear_weights(tiny_prior(), torch.float32).to_logits.weight.dtype == torch.float32


def test_precision_names():
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("half", torch.device("cpu"))


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_training_precision_auto_is_bf16_only_where_its_matmuls_are_native(monkeypatch, amx, avx512_bf16, expected):
    from sundae.runtime import native_bf16, resolve_training_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) == (expected == torch.bfloat16)
    assert resolve_training_precision("auto", cpu) == expected
    assert resolve_training_precision("float32", cpu) == torch.float32  # an explicit choice always wins
    assert resolve_training_precision("bfloat16", cpu) == torch.bfloat16


def test_ema_decay_warms_up_as_min_decay_and_1_plus_n_over_10_plus_n():
    from sundae.training.common import ExponentialMovingAverage

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ExponentialMovingAverage(model, decay=0.9)
    expected = 0.0
    for n, value in enumerate(float(v) for v in torch.randint(-5, 6, (100,), generator=torch.Generator().manual_seed(0))):
        decay = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        model.weight.data.fill_(value)
        ema.update(model)
        expected = decay * expected + (1 - decay) * value
        assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ema.current_decay() == 0.9  # (1 + n) / (10 + n) reaches 0.9 at n = 80
    restored = ExponentialMovingAverage(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 100 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
