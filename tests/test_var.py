"""VAR beside SUNDAE (issue 16): the multi-scale tokenizer, the next-scale transformer, its sampler,
pipeline, training loop and CLI, on tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import load_module

from sundae.cli import main
from sundae.config import NEXT_SCALE_PRESETS, VQGAN_PRESETS, ConfigError, MultiScaleVQGANConfig, NextScaleOptions
from sundae.errors import InputError
from sundae.pipelines import load_pipeline
from sundae.var import (MultiScaleVQGAN, NextScaleTransformer, block_causal_mask, next_scale_loss,
                        sample_next_scale)
from sundae.var.pipeline import VARPipeline

SCALES = (1, 2, 4)  # the tiny presets: 16x16 images, f = 4, a 4x4 grid, 1 + 4 + 16 = 21 tokens


def tiny_tokenizer(seed: int = 0) -> MultiScaleVQGAN:
    torch.manual_seed(seed)
    return MultiScaleVQGAN(VQGAN_PRESETS["tiny-msvq"]).eval()


def tiny_prior(num_classes: int | None = 3, seed: int = 0) -> NextScaleTransformer:
    torch.manual_seed(seed)
    return NextScaleTransformer(NEXT_SCALE_PRESETS["tiny"].replace(num_classes=num_classes)).eval()


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the multi-scale residual tokenizer ---------------------------------------------------------------


def test_the_scales_residuals_sum_to_the_full_scale_reconstruction_and_share_one_codebook():
    tokenizer = tiny_tokenizer()
    quantizer = tokenizer.quantize
    with torch.no_grad():
        features = tokenizer.encode_latents(images(2))
        output = quantizer(features)
    assert output.indices.shape == (2, 1, 21)
    grids = quantizer.split(output.indices)
    assert [tuple(grid.shape[1:]) for grid in grids] == [(1, 1), (2, 2), (4, 4)]
    contributions = quantizer.contributions(output.indices)
    # what the decoder sees (the straight-through output's value) is the sum of every scale's residual
    torch.testing.assert_close(output.quantized, torch.stack(contributions).sum(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(quantizer.lookup(output.indices), output.quantized, rtol=0, atol=1e-6)
    # one codebook for all scales: each contribution is made of the rows of quantize.embedding its codes name
    codebooks = [name for name, _ in quantizer.named_parameters() if "embedding" in name]
    assert codebooks == ["embedding.weight"]
    for scale, grid in enumerate(grids):
        changed = tiny_tokenizer().quantize
        changed.embedding.weight.data[grid.flatten()] += 1.0
        assert not torch.allclose(changed.contribution(scale, grid), quantizer.contribution(scale, grid))
        untouched = torch.tensor([code for code in range(64) if code not in set(grid.flatten().tolist())])
        changed = tiny_tokenizer().quantize
        changed.embedding.weight.data[untouched] += 1.0
        torch.testing.assert_close(changed.contribution(scale, grid), quantizer.contribution(scale, grid))
    # each scale quantises what the coarser ones left: the residual shrinks as scales are added
    errors = [(features - torch.stack(contributions[:k]).sum(0)).pow(2).mean().item() for k in range(1, 4)]
    assert errors[-1] < errors[0]


def test_encode_decode_take_packed_rows_and_prefixes_decode_to_coarse_previews():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(images(2))
    assert tokens.shape == (2, 1, 21) and tokens.dtype == torch.long
    with torch.no_grad():
        full = tokenizer.decode(tokens)
        coarse = tokenizer.decode(tokens[..., :5])  # scales 1 and 2 only
    assert full.shape == coarse.shape == (2, 3, 16, 16)
    assert not torch.allclose(full, coarse)
    with pytest.raises(InputError, match="prefix of whole scales"):
        tokenizer.decode(tokens[..., :6])


def test_a_scale_schedule_must_end_at_the_latent_grid():
    with pytest.raises(ConfigError, match="must end at the latent grid side 4"):
        MultiScaleVQGANConfig(**{**VQGAN_PRESETS["tiny-msvq"].to_dict(), "scales": (1, 2, 3)})
    with pytest.raises(ConfigError, match="strictly increasing"):
        MultiScaleVQGANConfig(**{**VQGAN_PRESETS["tiny-msvq"].to_dict(), "scales": (2, 1, 4)})


def test_a_multi_scale_tokenizer_starts_from_a_single_scale_one(tmp_path):
    from sundae.tokenizer import VQGAN
    from sundae.training.tokenizer import start_from

    torch.manual_seed(3)
    single = VQGAN(VQGAN_PRESETS["tiny-f4"].replace(codebook_size=64, resolution=16, attention_resolutions=(4,)))
    single.save_pretrained(tmp_path / "single")
    multi = tiny_tokenizer()
    phi_before = multi.quantize.phi[0].weight.clone()
    start_from(multi, tmp_path / "single")
    torch.testing.assert_close(multi.quantize.embedding.weight, single.quantize.embedding.weight)
    torch.testing.assert_close(multi.decoder.conv_out.weight, single.decoder.conv_out.weight)
    torch.testing.assert_close(multi.quantize.phi[0].weight, phi_before)


# --- the next-scale transformer ------------------------------------------------------------------------


def test_block_causal_mask_lets_a_scale_see_itself_and_coarser_scales_only():
    mask = block_causal_mask(SCALES)
    assert mask.shape == (21, 21)
    assert mask[0].tolist() == [True] + [False] * 20
    assert mask[1:5, :5].all() and not mask[1:5, 5:].any()
    assert mask[5:].all()


def test_a_scales_logits_do_not_change_when_a_finer_scales_inputs_change():
    prior = tiny_prior()
    inputs = torch.randn(2, 20, 32)
    changed = inputs.clone()
    changed[:, 4:] = torch.randn(2, 16, 32)  # scale 3's inputs
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        before, after = prior(inputs, labels), prior(changed, labels)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_the_loss_is_cross_entropy_over_every_scale_of_the_teacher_forced_pass():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    tokens = tokenizer.encode(images(3))
    labels = torch.tensor([0, 1, 2])
    loss, metrics = next_scale_loss(prior, tokenizer.quantize, tokens, labels)
    logits = prior(tokenizer.quantize.teacher_inputs(tokens), labels)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(loss, expected)
    last = torch.nn.functional.cross_entropy(logits[:, 5:].flatten(0, 1), tokens[..., 5:].flatten())
    torch.testing.assert_close(metrics["last_scale_loss"], last)
    loss.backward()
    assert prior.input_projection.weight.grad is not None
    assert all(parameter.grad is None for parameter in tokenizer.quantize.parameters())  # inputs are frozen


# --- the sampler -------------------------------------------------------------------------------------


def test_kv_cached_sampling_gives_the_tokens_of_recomputing_every_forward():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    labels = torch.tensor([0, 1, 2, 1])
    for options in (NextScaleOptions(), NextScaleOptions(guidance_scale=3.0, top_k=20, temperature=0.8)):
        cached = sample_next_scale(prior, tokenizer.quantize, class_labels=labels, seeds=[1, 2, 3, 4], options=options)
        recomputed = sample_next_scale(prior, tokenizer.quantize, class_labels=labels, seeds=[1, 2, 3, 4],
                                       options=options, use_cache=False)
        assert torch.equal(cached.tokens, recomputed.tokens)


def test_each_sample_depends_only_on_its_seed_and_the_ramp_changes_samples():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    options = NextScaleOptions(guidance_scale=4.0)
    batch = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 1, 2]), seeds=[5, 6, 7],
                              options=options).tokens
    alone = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([1]), seeds=[6],
                              options=options).tokens
    assert torch.equal(batch[1], alone[0])
    constant = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 1, 2]), seeds=[5, 6, 7],
                                 options=options.replace(guidance_schedule="constant")).tokens
    assert torch.equal(batch[:, :, :1], batch[:, :, :1])  # the ramp starts unguided ...
    assert not torch.equal(batch, constant)  # ... so its samples differ from constant guidance
    assert [options.guidance_at(k, 3) for k in range(3)] == [1.0, 2.5, 4.0]


def test_guidance_zero_is_the_unconditional_path():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    unguided = NextScaleOptions(guidance_scale=0.0, guidance_schedule="constant")
    zero = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 2]), seeds=[1, 2],
                             options=unguided)
    unconditional = sample_next_scale(prior, tokenizer.quantize, seeds=[1, 2])
    assert torch.equal(zero.tokens, unconditional.tokens)
    conditional = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 2]), seeds=[1, 2])
    assert not torch.equal(conditional.tokens, unconditional.tokens)


def test_inpainting_never_changes_known_tokens_at_any_scale():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    known = tokenizer.encode(images(2))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True  # the left half is known
    mask[1, 1:3, 1:3] = True  # a centre block
    output = sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 1]), seeds=[3, 4],
                               known_tokens=known, known_mask=mask)
    quantizer = tokenizer.quantize
    new, old = quantizer.split(output.tokens), quantizer.split(known)
    assert torch.equal(new[-1][mask], old[-1][mask])  # every known token of the finest grid
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    assert torch.equal(new[1][0][:, :1], old[1][0][:, :1])  # scale 2's left column covers only known tokens
    assert not torch.equal(new[-1][~mask], old[-1][~mask])  # the rest is sampled
    # a block of scale 2 that is only partly known is sampled, not forced
    assert torch.equal(output.tokens, sample_next_scale(prior, tokenizer.quantize, class_labels=torch.tensor([0, 1]),
                                                        seeds=[3, 4], known_tokens=known, known_mask=mask).tokens)


def test_the_trajectory_has_one_frame_per_scale():
    tokenizer, prior = tiny_tokenizer(), tiny_prior()
    output = sample_next_scale(prior, tokenizer.quantize, seeds=[1], return_trajectory=True)
    assert [frame.shape[-1] for frame in output.trajectory] == [1, 5, 21]
    assert torch.equal(output.trajectory[-1], output.tokens)
    stopped = sample_next_scale(prior, tokenizer.quantize, seeds=[1], callback=lambda scale, prefix: scale < 1)
    assert stopped.scales_done == 2 and torch.equal(stopped.tokens[..., :5], output.tokens[..., :5])


# --- the pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def var_model_dir(tmp_path_factory) -> Path:
    pipeline = VARPipeline(tiny_prior(), tiny_tokenizer(), class_names=["a", "b", "c"],
                           sampling_defaults=NextScaleOptions(guidance_scale=2.0))
    return pipeline.save_pretrained(tmp_path_factory.mktemp("var") / "model")


def test_save_load_gives_identical_outputs_and_the_directory_says_which_paradigm(var_model_dir, tiny_pipeline_dir):
    index = json.loads((var_model_dir / "model_index.json").read_text())
    assert index["kind"] == "var-pipeline" and index["components"]["prior"] == "NextScaleTransformer"
    loaded = load_pipeline(var_model_dir)
    assert isinstance(loaded, VARPipeline) and loaded.sampling_defaults.guidance_scale == 2.0
    assert type(load_pipeline(tiny_pipeline_dir)).__name__ == "SundaePipeline"
    original = VARPipeline(tiny_prior(), tiny_tokenizer(), class_names=["a", "b", "c"],
                           sampling_defaults=NextScaleOptions(guidance_scale=2.0))
    first = original(3, class_labels=["a", "b", "c"], seed=4, output_type="pt")
    again = loaded(3, class_labels=["a", "b", "c"], seed=4, output_type="pt")
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.images, again.images)
    from sundae.pipeline import SundaePipeline

    with pytest.raises(InputError, match="load_pipeline"):
        SundaePipeline.from_pretrained(var_model_dir)


def test_the_pipeline_inpaints_any_mask_and_outpaints_to_the_models_size(var_model_dir):
    pipeline = load_pipeline(var_model_dir)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    result = pipeline.inpaint(picture, mask, num_images=2, class_labels="b", seed=1, output_type="pt")
    known = pipeline.encode(picture)[1]
    quantizer = pipeline.tokenizer.quantize
    finest_mask = torch.zeros(4, 4, dtype=torch.bool)
    finest_mask[1:3, 1:3] = True
    for tokens in result.tokens:
        assert torch.equal(quantizer.split(tokens[None])[-1][0][~finest_mask], quantizer.split(known)[-1][0][~finest_mask])
    original = torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(result.images[:, :, ~torch.from_numpy(mask)], original[:, ~torch.from_numpy(mask)]
                               .expand(2, -1, -1), atol=1 / 127.5, rtol=0)  # known pixels are pasted back
    crop = picture.crop((0, 0, 12, 16))
    assert pipeline.outpaint(crop, right=4, seed=1).images[0].size == (16, 16)
    with pytest.raises(InputError, match="makes 16x16 images only"):
        pipeline.outpaint(crop, right=8)
    with pytest.raises(InputError, match="refine"):
        pipeline.refine(picture, mask)
    with pytest.raises(InputError, match="not options of this var-pipeline model"):
        pipeline(1, steps=10)


# --- training and the command line ---------------------------------------------------------------------


def write_folder(root: Path, count: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_cli_trains_both_stages_and_samples_inpaints_and_evaluates_a_var_model(tmp_path):
    folder = write_folder(tmp_path / "images")
    tokenizer = invoke("train-tokenizer", folder, "-o", tmp_path / "tok", "--preset", "tiny-msvq", "--steps", 2,
                       "--batch-size", 4, "--perceptual", "none", "--discriminator-layers", 1)
    assert tokenizer.exit_code == 0, tokenizer.output
    encoded = invoke("encode", folder, "--tokenizer", tmp_path / "tok" / "tokenizer", "-o", tmp_path / "latents",
                     "--validation-fraction", 0.3)
    assert encoded.exit_code == 0 and "grid 1x21" in encoded.output, encoded.output
    trained = invoke("train-var", tmp_path / "latents", "-o", tmp_path / "var", "--steps", 2, "--batch-size", 4,
                     "--eval-every", 2, "--sample-every", 2, "--ema-decay", 0.9)
    assert trained.exit_code == 0, trained.output
    model = tmp_path / "var" / "model"
    assert json.loads((model / "model_index.json").read_text())["kind"] == "var-pipeline"
    assert {"step_0000002_raw.png", "step_0000002_ema.png"} <= {p.name for p in (tmp_path / "var" / "samples").iterdir()}
    rows = [json.loads(line) for line in (tmp_path / "var" / "metrics.jsonl").read_text().splitlines()]
    assert any("validation_ema/loss" in row for row in rows) and any("train/last_scale_loss" in row for row in rows)
    sampled = invoke("sample", "--model", model, "-n", 4, "--classes", "a,b", "--guidance", 1.5, "--out",
                     tmp_path / "s.png", "--trajectory", tmp_path / "t.gif")
    assert sampled.exit_code == 0, sampled.output
    assert Image.open(tmp_path / "s.png").size[0] > 16 and Image.open(tmp_path / "t.gif").n_frames == 3
    inpainted = invoke("inpaint", folder / "a" / "0.png", "--model", model, "--box", "0,0,8,16", "-n", 2,
                       "--out", tmp_path / "i.png")
    assert inpainted.exit_code == 0 and (tmp_path / "i.png").is_file(), inpainted.output
    evaluated = invoke("evaluate", model, "--real", folder, "--extractor", "inception", "--extractor-path",
                       tmp_path / "none.pt", "--num-samples", 4, "--out", tmp_path / "e.json")
    assert evaluated.exit_code == 2  # no Inception file: one clear error, before any sampling


def encoded_folder(tmp_path: Path) -> Path:
    """A tiny image folder through a 1-step multi-scale tokenizer into ``tmp_path / "latents"``."""
    folder = write_folder(tmp_path / "images", count=4)
    assert invoke("train-tokenizer", folder, "-o", tmp_path / "tok", "--preset", "tiny-msvq", "--steps", 1,
                  "--batch-size", 4, "--perceptual", "none", "--discriminator-layers", 1).exit_code == 0
    assert invoke("encode", folder, "--tokenizer", tmp_path / "tok" / "tokenizer", "-o", tmp_path / "latents",
                  "--validation-fraction", 0.3).exit_code == 0
    return tmp_path / "latents"


def test_var_training_resumes_exactly(tmp_path):
    encoded_folder(tmp_path)
    common = ["--steps", 4, "--batch-size", 4, "--checkpoint-every", 2, "--ema-decay", 0.9, "--label-dropout", 0.5,
              "--eval-every", 100, "--sample-every", 100]
    assert invoke("train-var", tmp_path / "latents", "-o", tmp_path / "straight", *common).exit_code == 0
    assert invoke("train-var", tmp_path / "latents", "-o", tmp_path / "resumed", *common,
                  "--stop-after-steps", 2).exit_code == 0
    assert invoke("train-var", tmp_path / "latents", "-o", tmp_path / "resumed", *common).exit_code == 0
    for name in ("prior/model.safetensors", "tokenizer/model.safetensors"):
        assert (tmp_path / "straight" / "model" / name).read_bytes() == (tmp_path / "resumed" / "model" / name).read_bytes()


def test_var_training_runs_under_torchrun_with_two_gloo_ranks(tmp_path):
    import os
    import subprocess
    import sys

    encoded_folder(tmp_path)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sundae.cli", "train-var", str(tmp_path / "latents"), "-o", str(tmp_path / "ddp"),
                           "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--sample-every", "100", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_pipeline(tmp_path / "ddp" / "model").kind == "var-pipeline"
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert any("validation/loss" in row for row in rows)


def test_bad_inputs_give_one_clear_error_and_exit_2(tmp_path, var_model_dir, pixel_npz):
    folder = write_folder(tmp_path / "images", count=2)
    bad_scales = invoke("train-tokenizer", folder, "-o", tmp_path / "tok", "--preset", "tiny-f4", "--resolution", 16,
                        "--scales", "1,2,3", "--steps", 1)
    assert bad_scales.exit_code == 2
    assert bad_scales.output.strip().splitlines()[-1].startswith("error: MultiScaleVQGANConfig: the scale schedule")
    not_integers = invoke("train-tokenizer", folder, "-o", tmp_path / "tok", "--scales", "1,x", "--steps", 1)
    assert not_integers.exit_code == 2 and "--scales must be integers" in not_integers.output
    sundae_flag = invoke("sample", "--model", var_model_dir, "--steps", 10, "--out", tmp_path / "x.png")
    assert sundae_flag.exit_code == 2 and not (tmp_path / "x.png").exists()
    assert "--steps: not a sampling option of VAR models" in sundae_flag.output
    var_flag = invoke("sample", "--guidance-schedule", "constant", "--out", tmp_path / "y.png")
    assert var_flag.exit_code == 2 and "--guidance-schedule: not a sampling option of SUNDAE models" in var_flag.output
    refine = invoke("refine", folder / "a" / "0.png", "--model", var_model_dir, "--box", "0,0,8,8", "--out",
                    tmp_path / "r.png")
    assert refine.exit_code == 2 and "use inpaint on a VAR model" in refine.output
    pixel_tokens = invoke("train-var", pixel_npz, "-o", tmp_path / "v", "--steps", 1)
    assert pixel_tokens.exit_code == 2 and "multi-scale tokenizer" in pixel_tokens.output


def test_the_comparison_keeps_one_sides_rows_from_an_earlier_result_or_says_why_not(tmp_path):
    compare = load_module(Path(__file__).resolve().parent.parent / "scripts" / "compare_var.py", "compare_var")
    previous = tmp_path / "previous.json"
    rows = [{"setting": "SUNDAE, defaults", "paradigm": "sundae", "forward_passes_per_image": 50},
            {"setting": "VAR, defaults", "paradigm": "var", "forward_passes_per_image": 6},
            {"setting": "VAR, guidance 3 ramped", "paradigm": "var", "forward_passes_per_image": 6}]
    previous.write_text(json.dumps({"rows": rows, "tokenizers": {"var": {"fid": 3.1}}}))
    kept, tokenizer = compare.kept_results(previous, "var")
    assert [row["setting"] for row in kept] == ["VAR, defaults", "VAR, guidance 3 ramped"]
    assert tokenizer == {"fid": 3.1} and compare.passes_of(kept) == 6
    with pytest.raises(ValueError, match="no sundae rows to keep"):
        compare.kept_results(previous, "sundae")  # rows, but no tokenizer ceiling of that side
    with pytest.raises(ValueError, match="is not a file"):
        compare.kept_results(tmp_path / "missing.json", "var")
    kept_names = {name for name, paradigm, _ in compare.settings_of(50, 6) if paradigm == "var"}
    assert kept_names >= {row["setting"] for row in kept}, "kept rows are matched to the settings by name"
