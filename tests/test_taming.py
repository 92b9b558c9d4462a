"""Import of taming-transformers checkpoints.

The state dicts here are written from taming's documented key layout (not from our model),
and outputs are compared with a functional re-implementation of taming's encoder/decoder
that reads the state dict directly.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sundae.checkpoint import CheckpointError
from sundae.config import ConfigError
from sundae.tokenizer.taming import (
    InertGlobal,
    UnsafeCheckpointError,
    config_from_taming_yaml,
    convert_taming,
    infer_config_from_state_dict,
    load_taming_state_dict,
    load_taming_vqgan,
    read_checkpoint_payload,
)
from sundae.tokenizer.vqgan import VQGAN

# taming's ddconfig for the tests: ch 32, ch_mult (1, 2, 2), one res block, attention at
# resolution 8 of 32 (level 2), z_channels 32, embed_dim 32, n_embed 256 (= preset "tiny-f4")
VQ_LAYOUT = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), z_channels=32, embed_dim=32,
                 n_embed=256, gumbel=False)
GUMBEL_LAYOUT = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attention_levels=(1,), z_channels=32,
                     embed_dim=32, n_embed=128, gumbel=True)

MARKER_NAME = "unpickling-ran-code"


# ---------------------------------------------------------------------------------------------
# taming's state dict layout, written from taming/modules/diffusionmodules/model.py
# ---------------------------------------------------------------------------------------------


def taming_shapes(*, ch, ch_mult, num_res_blocks, attention_levels, z_channels, embed_dim, n_embed, gumbel,
                  in_ch=3, out_ch=3) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        attn(f"{name}.attn_1", c)
        resnet(f"{name}.block_2", c, c)

    levels = len(ch_mult)
    in_ch_mult = (1, *ch_mult)
    conv("encoder.conv_in", ch, in_ch, 3)
    for i in range(levels):
        block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i in attention_levels:
                attn(f"encoder.down.{i}.attn.{j}", block_out)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_out, block_out, 3)
    mid("encoder.mid", ch * ch_mult[-1])
    norm("encoder.norm_out", ch * ch_mult[-1])
    conv("encoder.conv_out", z_channels, ch * ch_mult[-1], 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z_channels, 3)
    mid("decoder.mid", block_in)
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i in attention_levels:
                attn(f"decoder.up.{i}.attn.{j}", block_out)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_out, block_out, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", out_ch, block_in, 3)

    conv("quant_conv", embed_dim, z_channels, 1)
    conv("post_quant_conv", z_channels, embed_dim, 1)
    if gumbel:
        conv("quantize.proj", n_embed, z_channels, 1)
        shapes["quantize.embed.weight"] = (n_embed, embed_dim)
    else:
        shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    return shapes


def random_taming_state(layout: dict, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random weights scaled so activations stay O(1) through the network."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in taming_shapes(**layout).items():
        values = torch.randn(shape, generator=generator)
        if len(shape) == 4:
            values = values / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif "norm" in key and key.endswith(".weight"):
            values = 1 + 0.1 * values
        elif key.endswith(".bias"):
            values = 0.1 * values
        state[key] = values
    return state


# ---------------------------------------------------------------------------------------------
# functional reference of taming's forward passes, reading the state dict directly
# ---------------------------------------------------------------------------------------------


def ref_conv(sd, name, x, **kwargs):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kwargs)


def ref_norm_swish(sd, name, x):
    h = F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def ref_resnet(sd, name, x):
    h = ref_conv(sd, f"{name}.conv1", ref_norm_swish(sd, f"{name}.norm1", x), padding=1)
    h = ref_conv(sd, f"{name}.conv2", ref_norm_swish(sd, f"{name}.norm2", h), padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = ref_conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def ref_attn(sd, name, x):
    h = F.group_norm(x, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = (ref_conv(sd, f"{name}.{part}", h) for part in ("q", "k", "v"))
    b, c, height, width = q.shape
    weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    weights = torch.softmax(weights, dim=2)
    h = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + ref_conv(sd, f"{name}.proj_out", h)


def ref_mid(sd, name, h):
    h = ref_resnet(sd, f"{name}.block_1", h)
    h = ref_attn(sd, f"{name}.attn_1", h)
    return ref_resnet(sd, f"{name}.block_2", h)


def ref_blocks(sd, name, h, count):
    for j in range(count):
        h = ref_resnet(sd, f"{name}.block.{j}", h)
        if f"{name}.attn.{j}.q.weight" in sd:
            h = ref_attn(sd, f"{name}.attn.{j}", h)
    return h


def ref_encode_latents(sd, layout, x):
    levels = len(layout["ch_mult"])
    h = ref_conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(levels):
        h = ref_blocks(sd, f"encoder.down.{i}", h, layout["num_res_blocks"])
        if i != levels - 1:
            h = ref_conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = ref_mid(sd, "encoder.mid", h)
    h = ref_conv(sd, "encoder.conv_out", ref_norm_swish(sd, "encoder.norm_out", h), padding=1)
    return ref_conv(sd, "quant_conv", h)


def ref_encode(sd, layout, x):
    z = ref_encode_latents(sd, layout, x)
    if layout["gumbel"]:
        return ref_conv(sd, "quantize.proj", z).argmax(dim=1)
    codebook = sd["quantize.embedding.weight"]
    squared = ((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(dim=-1)
    return squared.argmin(dim=-1)


def ref_decode(sd, layout, indices):
    codebook = sd["quantize.embed.weight" if layout["gumbel"] else "quantize.embedding.weight"]
    h = ref_conv(sd, "post_quant_conv", codebook[indices].permute(0, 3, 1, 2))
    h = ref_mid(sd, "decoder.mid", ref_conv(sd, "decoder.conv_in", h, padding=1))
    for i in reversed(range(len(layout["ch_mult"]))):
        h = ref_blocks(sd, f"decoder.up.{i}", h, layout["num_res_blocks"] + 1)
        if i != 0:
            h = ref_conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"),
                         padding=1)
    return ref_conv(sd, "decoder.conv_out", ref_norm_swish(sd, "decoder.norm_out", h), padding=1)


# ---------------------------------------------------------------------------------------------
# Lightning-like payloads
# ---------------------------------------------------------------------------------------------


def record_unpickling(marker: str) -> None:
    """Would leave a trace if a checkpoint could make the loader call it."""
    Path(marker).write_text("executed")


class RecordingCallback:
    """Stands for a Lightning callback: unpickling it for real would call record_unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return record_unpickling, (str(self.marker),)


def lightning_payload(state: dict, marker: Path) -> dict:
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "callbacks": {RecordingCallback: RecordingCallback(marker)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
        "hyper_parameters": argparse.Namespace(base_learning_rate=4.5e-6),
    }


def with_loss_weights(state: dict) -> OrderedDict:
    extra = {
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        "loss.logvar": torch.zeros(()),
    }
    return OrderedDict({**state, **extra})


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_matches_reference(model: VQGAN, state: dict, layout: dict) -> None:
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(x), ref_encode_latents(state, layout, x), atol=1e-5, rtol=1e-5)
        indices = model.encode(x)
        assert torch.equal(indices, ref_encode(state, layout, x))
        indices = torch.randint(0, layout["n_embed"], indices.shape, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.decode(indices), ref_decode(state, layout, indices), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False])
def test_vqmodel_checkpoint_matches_taming_reference(tmp_path, zip_format: bool) -> None:
    state = random_taming_state(VQ_LAYOUT)
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(with_loss_weights(state), marker), path, _use_new_zipfile_serialization=zip_format)

    model = load_taming_vqgan(path)
    assert not marker.exists()
    config = model.config
    assert (config.channels, config.channel_multipliers, config.num_res_blocks) == (32, (1, 2, 2), 1)
    assert (config.z_channels, config.embed_dim, config.codebook_size, config.quantizer) == (32, 32, 256, "vq")
    assert config.attention_resolutions == (config.resolution // 4,)
    assert not model.training
    assert_matches_reference(model, state, VQ_LAYOUT)


def test_net2net_first_stage_is_extracted(tmp_path) -> None:
    state = random_taming_state(VQ_LAYOUT, seed=3)
    net2net = OrderedDict({f"first_stage_model.{k}": v for k, v in with_loss_weights(state).items()})
    net2net["transformer.tok_emb.weight"] = torch.randn(256, 16)
    net2net["transformer.blocks.0.attn.key.weight"] = torch.randn(16, 16)
    net2net["cond_stage_model.embedding.weight"] = torch.randn(10, 16)
    path = tmp_path / "ffhq.ckpt"
    torch.save(lightning_payload(net2net, tmp_path / MARKER_NAME), path)
    assert_matches_reference(load_taming_vqgan(path), state, VQ_LAYOUT)


def test_gumbel_checkpoint_matches_taming_reference(tmp_path) -> None:
    state = random_taming_state(GUMBEL_LAYOUT, seed=4)
    path = tmp_path / "gumbel.ckpt"
    torch.save(lightning_payload(with_loss_weights(state), tmp_path / MARKER_NAME), path)
    model = load_taming_vqgan(path, resolution=32)  # a layout no preset has: the resolution must be given
    assert model.config.quantizer == "gumbel" and model.config.num_res_blocks == 2
    assert (model.config.resolution, model.config.attention_resolutions) == (32, (16,))
    assert_matches_reference(model, state, GUMBEL_LAYOUT)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


DDCONFIG_YAML = """
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
"""


def test_yaml_config_is_honoured(tmp_path) -> None:
    state = random_taming_state(VQ_LAYOUT)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(state, tmp_path / MARKER_NAME), path)
    config_path = write_yaml(tmp_path / "project.yaml", f"""
model:
  base_learning_rate: 4.5e-6
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 32
    n_embed: 256
{DDCONFIG_YAML}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
""")
    model = load_taming_vqgan(path, config_path=config_path)
    assert (model.config.resolution, model.config.attention_resolutions) == (32, (8,))
    assert_matches_reference(model, state, VQ_LAYOUT)

    wrong = write_yaml(tmp_path / "wrong.yaml", config_path.read_text().replace("n_embed: 256", "n_embed: 512"))
    mismatch = r"quantize\.embedding\.weight: checkpoint \(256, 32\) vs model \(512, 32\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_taming_vqgan(path, config_path=wrong)


def test_net2net_yaml_with_gumbel_first_stage(tmp_path) -> None:
    state = random_taming_state(GUMBEL_LAYOUT, seed=5)
    path = tmp_path / "net2net.ckpt"
    torch.save(lightning_payload({f"first_stage_model.{k}": v for k, v in state.items()}, tmp_path / MARKER_NAME), path)
    ddconfig = DDCONFIG_YAML.replace("[1, 2, 2]", "[1, 1, 2]").replace("num_res_blocks: 1", "num_res_blocks: 2")
    ddconfig = ddconfig.replace("[8]", "[16]").replace("\n    ", "\n        ")
    config_path = write_yaml(tmp_path / "net2net.yaml", f"""
model:
  target: taming.models.cond_transformer.Net2NetTransformer
  params:
    first_stage_config:
      target: taming.models.vqgan.GumbelVQ
      params:
        embed_dim: 32
        n_embed: 128
{ddconfig}
""")
    model = load_taming_vqgan(path, config_path=config_path)
    assert (model.config.quantizer, model.config.attention_resolutions) == ("gumbel", (16,))
    assert_matches_reference(model, state, GUMBEL_LAYOUT)


def test_preset_is_honoured_and_mismatches_are_listed(tmp_path) -> None:
    state = random_taming_state(VQ_LAYOUT)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state}, path)
    assert_matches_reference(load_taming_vqgan(path, preset="tiny-f4"), state, VQ_LAYOUT)
    del state["decoder.conv_out.bias"]
    state["quantize.unexpected"] = torch.zeros(1)
    torch.save(state, path)  # a flat dict of tensors is accepted too
    listed = r"missing \(1\): decoder\.conv_out\.bias[\s\S]*unexpected \(1\): quantize\.unexpected"
    with pytest.raises(CheckpointError, match=listed):
        load_taming_vqgan(path, preset="tiny-f4")
    with pytest.raises(ConfigError, match="one of config_path, preset or resolution"):
        load_taming_vqgan(path, config_path=tmp_path / "x.yaml", preset="tiny-f4")


def test_convert_taming_writes_a_pretrained_directory(tmp_path) -> None:
    state = random_taming_state(VQ_LAYOUT)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(state, tmp_path / MARKER_NAME), path)
    out = convert_taming(path, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["converted_from"] == "last.ckpt"
    assert_matches_reference(VQGAN.from_pretrained(out).eval(), state, VQ_LAYOUT)


def test_foreign_globals_become_inert_placeholders(tmp_path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(random_taming_state(VQ_LAYOUT), marker), path)
    payload = read_checkpoint_payload(path)
    assert not marker.exists()
    (callback_class, callback), = payload["callbacks"].items()
    assert issubclass(callback_class, InertGlobal) and callback_class.name == "RecordingCallback"
    assert isinstance(callback, InertGlobal) and callback.name == "record_unpickling"
    assert callback.args == (str(marker),)
    assert payload["hyper_parameters"].module == "argparse" and payload["hyper_parameters"].name == "Namespace"
    assert payload["epoch"] == 3 and isinstance(payload["state_dict"], OrderedDict)


class SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecCall(SystemCall):
    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


@pytest.mark.parametrize("gadget", [SystemCall, ExecCall])
@pytest.mark.parametrize("raw_pickle", [False, True])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, gadget, raw_pickle: bool) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.ckpt"
    if raw_pickle:
        path.write_bytes(pickle.dumps(gadget(marker), protocol=2))
    else:
        torch.save({"state_dict": random_taming_state(VQ_LAYOUT), "callbacks": gadget(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load: .*(system|exec)"):
        load_taming_vqgan(path)
    assert not marker.exists()


def test_corrupted_checkpoints_are_a_clear_error(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(random_taming_state(VQ_LAYOUT), tmp_path / MARKER_NAME), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as caught:
        load_taming_state_dict(path)
    assert "download" not in str(caught.value)  # the same words reach hostile files: never "fetch it again"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_taming_state_dict(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_taming_state_dict(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "epoch": 3}}, path)
    with pytest.raises(CheckpointError, match=r"non-tensor entries \['epoch'\]"):
        load_taming_state_dict(path)


def test_kl_autoencoders_are_rejected() -> None:
    state = random_taming_state(VQ_LAYOUT)
    state["encoder.conv_out.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(CheckpointError, match="KL autoencoder"):
        infer_config_from_state_dict(state)


# taming's f16 first stages (256²) and the paper's f=32 model (1024², Table 4), as shapes only
TAMING_F16_LAYOUT = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention_levels=(4,), z_channels=256,
                         embed_dim=256, n_embed=1024, gumbel=False)
PAPER_F32_LAYOUT = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attention_levels=(4, 5),
                        z_channels=256, embed_dim=256, n_embed=8192, gumbel=False)


def meta_state(layout: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in taming_shapes(**layout).items()}


@pytest.mark.parametrize("layout, resolution, attention", [
    (TAMING_F16_LAYOUT, 256, (16,)),
    (PAPER_F32_LAYOUT, 1024, (64, 32)),  # was read as 256², so `sundae encode` worked at a quarter size
    (VQ_LAYOUT, 32, (8,)),
])
def test_resolution_is_taken_from_the_preset_the_weights_match(layout, resolution: int, attention) -> None:
    config = infer_config_from_state_dict(meta_state(layout))
    assert (config.resolution, config.attention_resolutions) == (resolution, attention)


def test_resolution_must_be_given_when_the_weights_match_no_preset(tmp_path) -> None:
    unknown = {**PAPER_F32_LAYOUT, "n_embed": 4096}
    with pytest.raises(ConfigError, match=r"not stored in the weights[\s\S]*f=32, 6 levels[\s\S]*--config") as caught:
        infer_config_from_state_dict(meta_state(unknown))
    assert caught.value.field == "resolution"
    config = infer_config_from_state_dict(meta_state(unknown), resolution=512)
    assert (config.resolution, config.attention_resolutions) == (512, (32, 16))  # attention stays at levels 4, 5
    with pytest.raises(ConfigError, match="multiple of the downsampling factor 32"):
        infer_config_from_state_dict(meta_state(unknown), resolution=500)

    state = random_taming_state(GUMBEL_LAYOUT)
    path = tmp_path / "gumbel.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConfigError, match="resolution"):
        convert_taming(path, tmp_path / "out")
    out = convert_taming(path, tmp_path / "out", resolution=64)
    assert json.loads((out / "config.json").read_text())["config"]["resolution"] == 64
    with pytest.raises(ConfigError, match="one of config_path, preset or resolution"):
        convert_taming(path, tmp_path / "out", preset="tiny-f4", resolution=64)


TAMING_YAML = f"""
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 32
    n_embed: 256
{DDCONFIG_YAML}"""


@pytest.mark.parametrize("old, new, key", [
    ("resolution: 32", "resolution: [1, 2]", "ddconfig.resolution"),
    ("resolution: 32", "resolution: 32.5", "ddconfig.resolution"),
    ("ch: 32", "ch: '32'", "ddconfig.ch"),
    ("ch_mult: [1, 2, 2]", "ch_mult: 2", "ddconfig.ch_mult"),
    ("n_embed: 256", "n_embed: 1000000000000", "params.n_embed"),  # 32 TB of codebook
    ("attn_resolutions: [8]", "attn_resolutions: [eight]", "ddconfig.attn_resolutions"),
    ("dropout: 0.0", "dropout: null", "ddconfig.dropout"),
])
def test_taming_yaml_values_are_checked_by_type_and_range(tmp_path, old: str, new: str, key: str) -> None:
    assert old in TAMING_YAML
    path = write_yaml(tmp_path / "project.yaml", TAMING_YAML.replace(old, new))
    with pytest.raises(ConfigError, match=f"yaml key {key}") as caught:
        config_from_taming_yaml(path)
    assert str(path) in str(caught.value)
    assert config_from_taming_yaml(write_yaml(tmp_path / "good.yaml", TAMING_YAML)).resolution == 32


def test_malformed_taming_yaml_is_a_config_error(tmp_path) -> None:
    levels = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 ones, by reference
    alias_bomb = "\n".join(levels) + TAMING_YAML.replace("ch_mult: [1, 2, 2]", "ch_mult: *l8")
    for text, match in (
        (alias_bomb, "ddconfig.ch_mult must be a number or a list of numbers"),
        (TAMING_YAML.replace("double_z: false", "double_z: 'false'"), "double_z must be true or false"),
        ("model: [1, 2]", "'model' should be a mapping"),
        ("model:\n  params: {ddconfig: {double_z: false}}\n", "missing 'resolution'"),
        ("{{{", "not valid YAML"),
    ):
        with pytest.raises(ConfigError, match=match):
            config_from_taming_yaml(write_yaml(tmp_path / "bad.yaml", text))
