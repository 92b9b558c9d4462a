"""SundaePipeline: persistence, sampling, and the keep-mask guarantees of inpaint/outpaint/refine (§3.6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from sundae.checkpoint import CheckpointError
from sundae.config import HourglassConfig, VQGANConfig
from sundae.data.latents import tokenizer_identity
from sundae.denoiser import Hourglass
from sundae.errors import InputError
from sundae.pipeline import (PRIOR_SUBDIR, TOKENIZER_SUBDIR, SundaePipeline, box_mask, token_mask_from_pixels,
                             write_model_directory)
from sundae.tokenizer import VQGAN
from sundae.training.prior import check_same_data


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_save_and_load_give_the_same_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again = SundaePipeline.from_pretrained(tmp_path / "copy", device="cpu")
    a = pipe(2, seed=3, steps=3, output_type="pt", class_labels=[0, 1])
    b = again(2, seed=3, steps=3, output_type="pt", class_labels=[0, 1])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    assert again.class_names == ["class0", "class1", "class2"] and again.image_size == (16, 16)


def test_seed_gives_each_image_its_own_sample(pipe):
    batch = pipe(3, seed=10, steps=3, output_type="pt")
    single = pipe(1, seed=12, steps=3, output_type="pt")
    assert torch.equal(batch.tokens[2], single.tokens[0])
    assert len(pipe(2, seed=0, steps=2).images) == 2


def test_token_mask_rules():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True  # one pixel of the top-left 2x2 patch
    mask[2:4, 2:4] = True  # the whole bottom-right patch
    assert token_mask_from_pixels(mask, 2, "any").tolist() == [[True, False], [False, True]]
    assert token_mask_from_pixels(mask, 2, "all").tolist() == [[False, False], [False, True]]
    with pytest.raises(ValueError, match="multiple"):
        token_mask_from_pixels(torch.zeros(5, 4, dtype=torch.bool), 2)


def test_inpainting_keeps_known_tokens_and_pixels(pipe, picture):
    mask = box_mask((16, 16), (3, 5, 9, 12))
    _, known = pipe.encode(picture)
    result = pipe.inpaint(picture, mask, num_images=3, seed=0, steps=4, output_type="pt")
    token_mask = token_mask_from_pixels(mask, 2, "any")
    assert all(torch.equal(tokens[~token_mask], known[0][~token_mask]) for tokens in result.tokens)
    assert not torch.equal(result.tokens[0][token_mask], result.tokens[1][token_mask])  # diverse fills
    original = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(result.images[:, :, ~mask], original[:, ~mask].expand(3, -1, -1), atol=1e-6)


def test_refine_with_zero_strength_starts_from_the_current_tokens(pipe, picture):
    mask = box_mask((16, 16), (0, 0, 8, 8))
    _, known = pipe.encode(picture)
    result = pipe.refine(picture, mask, strength=0.0, num_images=2, seed=0, steps=3, output_type="pt")
    token_mask = token_mask_from_pixels(mask, 2)
    assert torch.equal(result.tokens[0][~token_mask], known[0][~token_mask])
    with pytest.raises(ValueError, match="strength"):
        pipe.refine(picture, mask, strength=1.5)


def test_outpainting_keeps_the_original_tokens(pipe, picture):
    _, known = pipe.encode(picture)
    result = pipe.outpaint(picture, left=4, bottom=2, num_images=2, seed=0, steps=3, output_type="pt")
    assert result.tokens.shape == (2, 9, 10)
    assert all(torch.equal(tokens[0:8, 2:10], known[0]) for tokens in result.tokens)
    assert result.images.shape == (2, 3, 18, 20)
    with pytest.raises(ValueError, match="multiples"):
        pipe.outpaint(picture, left=3)


def test_bad_inputs_give_clear_errors(pipe, picture, tmp_path):
    with pytest.raises(ValueError, match="same size"):
        pipe.inpaint(picture, np.ones((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="multiples of the tokenizer factor"):
        pipe.inpaint(picture.crop((0, 0, 15, 16)), np.ones((16, 15), dtype=bool))
    with pytest.raises(ValueError, match="unknown class"):
        pipe(1, class_labels="dog")
    with pytest.raises(ValueError, match="out of range"):
        pipe(1, class_labels=7)
    with pytest.raises(FileNotFoundError):
        pipe.inpaint(tmp_path / "missing.png", np.ones((16, 16), dtype=bool))
    with pytest.raises(CheckpointError):
        SundaePipeline.from_pretrained(tmp_path)


def test_bfloat16_decoder_holds_bf16_weights_and_decodes_close_to_float32(tiny_pipeline_dir):
    full = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    half = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu", precision="bfloat16")
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert half.tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16
    assert half.tokenizer.quantize.embedding.weight.dtype == torch.float32  # the codebook stays fp32
    tokens = full(3, seed=4, steps=3, output_type="pt").tokens
    exact, approximate = full.decode(tokens), half.decode(tokens)
    assert approximate.dtype == torch.float32 and approximate.shape == exact.shape
    assert 0 < (approximate - exact).abs().max() < 0.05
    sampled = half(3, seed=4, steps=3, output_type="pt")  # the prior under bf16 autocast
    assert sampled.tokens.shape == tokens.shape and sampled.images.isfinite().all()


def test_decode_tiles_and_runtime_options_are_checked(tiny_pipeline_dir, monkeypatch):
    tiled = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu", decode_tiles=1)
    plain = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    tokens = plain(2, seed=1, steps=2, output_type="pt").tokens
    assert torch.equal(tiled.decode(tokens), plain.decode(tokens))
    with pytest.raises(ValueError, match="decode_tiles"):
        SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu", decode_tiles=0)
    with pytest.raises(ValueError, match="precision"):
        SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu", precision="float16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cuda")


def weight_files(directory) -> dict[str, dict[str, torch.Tensor]]:
    return {"prior": load_file(directory / PRIOR_SUBDIR / "model.safetensors"),
            "tokenizer": load_file(directory / TOKENIZER_SUBDIR / "model.safetensors")}


def test_a_bfloat16_pipeline_saves_the_weights_it_loaded_bit_for_bit(tiny_pipeline_dir, tmp_path):
    half = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu", precision="bfloat16")
    half(2, seed=0, steps=2, output_type="pt")
    half.save_pretrained(tmp_path / "copy")
    original, saved = weight_files(tiny_pipeline_dir), weight_files(tmp_path / "copy")
    for part in ("prior", "tokenizer"):
        assert saved[part].keys() == original[part].keys()
        for key, tensor in original[part].items():
            assert saved[part][key].dtype == tensor.dtype == torch.float32, key
            assert torch.equal(saved[part][key].view(torch.int32), tensor.view(torch.int32)), key  # bit for bit


def test_a_saved_prior_names_the_tokenizer_saved_beside_it(pipe, tmp_path):
    """`--init-from` a saved model checks that the latents are its tokenizer's codes: a pipeline's save (here at
    half precision, which changes the weights and so the codes' hash) records the tokenizer it writes, so
    latents encoded by that saved tokenizer are accepted; a record the caller gives (a training run's) is kept."""
    saved = pipe.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    trained_on = json.loads((saved / PRIOR_SUBDIR / "config.json").read_text())["data"]
    encoded_with = tokenizer_identity(saved / TOKENIZER_SUBDIR)
    assert trained_on["tokenizer"] == encoded_with
    assert trained_on["tokenizer"]["codes_sha256"] != tokenizer_identity(pipe.save_pretrained(tmp_path / "full")
                                                                         / TOKENIZER_SUBDIR)["codes_sha256"]
    check_same_data(trained_on, {"codebook_size": trained_on["codebook_size"], "tokenizer": encoded_with}, saved)

    record = {"codebook_size": 16, "tokenizer": {"sha256": "of the latents' tokenizer"}}
    kept = write_model_directory(tmp_path / "run", prior=pipe.master_prior, tokenizer=pipe.master_tokenizer,
                                 scheduler=pipe.sampling_defaults, prior_extra={"data": record})
    assert json.loads((kept / PRIOR_SUBDIR / "config.json").read_text())["data"] == record


def test_float16_weights_ship_at_half_the_size_and_load_as_the_rounded_float32_model(pipe, tiny_pipeline_dir,
                                                                                   tmp_path):
    pipe.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    original, saved = weight_files(tiny_pipeline_dir), weight_files(tmp_path / "half")
    for part in ("prior", "tokenizer"):
        for key, tensor in original[part].items():
            expected_dtype = torch.float16 if tensor.is_floating_point() else tensor.dtype
            assert saved[part][key].dtype == expected_dtype, key
        size = (tmp_path / "half" / part / "model.safetensors").stat().st_size
        full = (tiny_pipeline_dir / part / "model.safetensors").stat().st_size
        assert 0.45 < size / full < 0.56, (part, size, full)
    loaded = SundaePipeline.from_pretrained(tmp_path / "half", device="cpu")
    for key, tensor in loaded.master_prior.state_dict().items():
        assert tensor.dtype == original["prior"][key].dtype  # the model computes in its own precision
        assert torch.equal(tensor, original["prior"][key].half().to(tensor.dtype)), key
    images = loaded(2, seed=3, steps=3, output_type="pt").images
    reference = pipe(2, seed=3, steps=3, output_type="pt").images
    assert (images - reference).abs().mean() < 0.05

def test_precision_leaves_the_modules_given_as_they_were(picture):
    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16))
    prior = Hourglass(HourglassConfig(codebook_size=16, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(8, 8), num_classes=None)).train()
    before = {name: {key: value.clone() for key, value in module.state_dict().items()}
              for name, module in (("prior", prior), ("tokenizer", tokenizer))}
    half = SundaePipeline(prior, tokenizer, precision="bfloat16")
    half(2, seed=1, steps=3, output_type="pt")
    half.inpaint(picture, box_mask((16, 16), (0, 0, 8, 8)), seed=1, steps=2, output_type="pt")
    for name, module in (("prior", prior), ("tokenizer", tokenizer)):
        after = module.state_dict()
        assert after.keys() == before[name].keys()
        for key, value in before[name].items():
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), (name, key)
    assert prior.training and half.master_prior is prior and half.master_tokenizer is tokenizer
    # what runs is cast once: bf16 Linear weights and decoder, sharing the tensors the cast leaves alone
    linears = [layer for layer in half.prior.modules() if isinstance(layer, nn.Linear)]
    assert linears and all(layer.weight.dtype == torch.bfloat16 for layer in linears)
    assert half.tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16 and not half.prior.training
    assert half.tokenizer.encoder.conv_in.weight.data_ptr() == tokenizer.encoder.conv_in.weight.data_ptr()
    full = SundaePipeline(prior, tokenizer, precision="float32")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(full.prior.parameters(), prior.parameters()))


def test_output_types_are_checked_and_latent_skips_decoding(tiny_pipeline_dir):
    import numpy as np

    from sundae.errors import InputError
    from sundae.pipeline import SundaePipeline

    pipe = SundaePipeline.from_pretrained(tiny_pipeline_dir)
    tensor = pipe(2, class_labels=[0, 1], seed=3, steps=2, output_type="pt")
    array = pipe(2, class_labels=[0, 1], seed=3, steps=2, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(array, ((tensor.images + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    latent = pipe(2, class_labels=[0, 1], seed=3, steps=2, output_type="latent")
    assert latent.images is None and torch.equal(latent.tokens, tensor.tokens)
    with pytest.raises(InputError, match="output_type must be one of pil, pt, np, latent"):
        pipe(1, steps=2, output_type="numpy")


@pytest.mark.parametrize("data, message", [(None, "must be an object"), (5, "must be an object"),
                                           ({"class_names": 5}, "class_names must be a list"),
                                           ({"codebook_size": "16"}, "codebook_size must be an integer")])
def test_a_model_whose_data_section_has_wrong_types_is_refused(tiny_pipeline_dir, tmp_path, data, message):
    import shutil

    from sundae.pipeline import SundaePipeline

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    payload = json.loads((broken / "prior" / "config.json").read_text())
    (broken / "prior" / "config.json").write_text(json.dumps({**payload, "data": data}))
    with pytest.raises(CheckpointError, match=message):
        SundaePipeline.from_pretrained(broken)


# --- the model directory: model_index.json, prior/, tokenizer/, scheduler/ ------------------------


def test_save_and_load_round_trip_the_scheduler_defaults(pipe, tmp_path):
    import sundae
    from sundae.config import SamplingOptions

    chosen = SamplingOptions(steps=7, end_temperature=0.45, top_k=5, early_stop=False, min_steps=2)
    SundaePipeline(pipe.master_prior, pipe.master_tokenizer, class_names=pipe.class_names,
                   sampling_defaults=chosen).save_pretrained(tmp_path / "tuned")
    index = json.loads((tmp_path / "tuned" / "model_index.json").read_text())
    assert index == {"format": "sundae-model", "format_version": 1, "kind": "sundae-pipeline",
                     "library_version": sundae.__version__,
                     "components": {"prior": "Hourglass", "tokenizer": "VQGAN", "scheduler": "SamplingOptions"}}
    scheduler = json.loads((tmp_path / "tuned" / "scheduler" / "config.json").read_text())
    assert scheduler == {"class": "SamplingOptions", "config": chosen.to_dict()}  # every field, defaults too
    assert len(scheduler["config"]) == 13 and scheduler["config"]["top_p"] is None
    loaded = SundaePipeline.from_pretrained(tmp_path / "tuned", device="cpu")
    assert loaded.sampling_defaults == chosen
    assert loaded.sampling_options(edit=True) == chosen.replace(temperature=0.4, end_temperature=0.4)
    assert loaded.sampling_options(edit=True, temperature=0.9).temperature == 0.9  # explicit beats the edit default
    # no options: the model's 7 steps (none stops early); given ones override
    assert loaded(2, seed=1, output_type="latent").steps_taken.tolist() == [7, 7]
    assert loaded(2, seed=1, steps=3, output_type="latent").steps_taken.tolist() == [3, 3]
    same = pipe(2, seed=1, output_type="latent", **chosen.to_dict())
    assert torch.equal(loaded(2, seed=1, output_type="latent").tokens, same.tokens)
    with pytest.raises(InputError, match="unknown field"):
        loaded(1, stepz=3)


def test_an_old_layout_directory_is_refused_with_the_command_that_converts_it(old_layout_dir):
    with pytest.raises(CheckpointError) as refused:
        SundaePipeline.from_pretrained(old_layout_dir)
    message = str(refused.value)
    assert "\n" not in message and "old layout" in message
    assert f"sundae convert-model {old_layout_dir} NEW_DIR" in message


def test_saving_never_replaces_a_folder_of_other_files(pipe, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds other files"):
        pipe.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    pipe.save_pretrained(tmp_path / "model")
    pipe.save_pretrained(tmp_path / "model")  # a model directory is replaced whole
    assert sorted(path.name for path in (tmp_path / "model").iterdir()) == \
        ["model_index.json", "prior", "scheduler", "tokenizer"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "model_index.json").write_text('{"format": "sundae-model", "format_version": 9, '
                                                  '"kind": "sundae-pipeline"}'), "format_version 9"),
    (lambda d: (d / "model_index.json").write_text('{"format": "sundae-model", "format_version": 1, '
                                                  '"kind": "sundae-pipeline", "components": {"prior": "x"}}'),
     "components"),
    (lambda d: (d / "scheduler" / "config.json").write_text('{"class": "SamplingOptions", "config": {"steps": 0}}'),
     "steps must be >= 1"),
    (lambda d: (d / "model_index.json").unlink(), "no model_index.json"),
])
def test_a_broken_index_or_scheduler_is_one_clear_error(tiny_pipeline_dir, tmp_path, edit, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    edit(broken)
    with pytest.raises(InputError, match=message) as refused:
        SundaePipeline.from_pretrained(broken)
    assert "\n" not in str(refused.value)


def test_the_models_guidance_applies_to_calls_with_a_class(scheduled_pipeline_dir):
    pipe = SundaePipeline.from_pretrained(scheduled_pipeline_dir, device="cpu")
    assert pipe.sampling_defaults.guidance_scale == 2.0

    def tokens(**arguments) -> torch.Tensor:
        return pipe(2, seed=3, output_type="latent", **arguments).tokens

    assert torch.equal(tokens(), tokens(guidance_scale=1.0))  # no class: nothing to guide
    guided = tokens(class_labels=[0, 1])
    assert torch.equal(guided, tokens(class_labels=[0, 1], guidance_scale=2.0))
    assert not torch.equal(guided, tokens(class_labels=[0, 1], guidance_scale=1.0))
    with pytest.raises(InputError, match="guidance needs class_labels"):  # asked for, it is refused
        tokens(guidance_scale=2.0)
