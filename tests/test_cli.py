"""The command line: what each command writes, and one clear error line with exit code 2 for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sundae.cli import FLAG_NAMES, main


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def write_grey_images(folder, *, side: int, count: int = 12, channels: int = 1):
    folder.mkdir()
    rng = np.random.default_rng(0)
    shape = (side, side) if channels == 1 else (side, side, channels)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sample_writes_grid_images_and_trajectory(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = run("sample", tiny_pipeline_dir, "--out", out, "-n", 3, "--steps", 2, "--classes", "class1,0",
                 "--per-image-dir", tmp_path / "each", "--trajectory", tmp_path / "denoise.gif")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 16 and len(list((tmp_path / "each").glob("*.png"))) == 3
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 2
    assert "3 images" in result.output


def test_sample_in_bfloat16_with_tiled_decoding(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = run("sample", tiny_pipeline_dir, "--out", out, "-n", 2, "--steps", 2, "--precision", "bfloat16",
                 "--decode-tiles", 2)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    too_many = run("sample", tiny_pipeline_dir, "--out", out, "-n", 1, "--steps", 1, "--decode-tiles", 99)
    assert too_many.exit_code == 2 and "decode_tiles must be between 1 and 8" in too_many.output
    assert "sampling" not in too_many.output  # refused before any work


def test_inpaint_outpaint_refine_write_results(tiny_pipeline_dir, image_path, tmp_path):
    mask = tmp_path / "mask.png"
    array = np.zeros((16, 16), dtype=np.uint8)
    array[4:10, 4:10] = 255
    Image.fromarray(array).save(mask)
    for args in (["inpaint", image_path, "--mask", mask], ["inpaint", image_path, "--box", "0,0,8,8"],
                 ["refine", image_path, "--box", "2,2,6,6", "--strength", "0.3"],
                 ["outpaint", image_path, "--right", 4]):
        out = tmp_path / f"{args[0]}.png"
        result = run(*args, "--model", tiny_pipeline_dir, "--out", out, "-n", 2, "--steps", 2)
        assert result.exit_code == 0, result.output
        assert out.is_file()


def test_describe_prints_parameter_count():
    result = run("describe", "tiny", "--no-time-step")
    assert result.exit_code == 0
    facts = json.loads(result.output)
    assert facts["parameters"] > 0 and facts["tokens_per_level"] == [64, 16]


@pytest.mark.parametrize("args, message", [
    (["sample", "{model}", "--out", "{tmp}/x.png", "--steps", "0"], "steps"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--temperature", "0"], "temperature"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--end-temperature", "-1"], "temperature"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--classes", "dog"], "unknown class"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--classes", "9"], "out of range"),
    (["sample", "{tmp}/no-model", "--out", "{tmp}/x.png"], "does not exist"),
    (["inpaint", "{tmp}/missing.png", "--box", "0,0,4,4", "--model", "{model}", "--out", "{tmp}/x.png"], "does not exist"),
    (["inpaint", "{image}", "--mask", "{tmp}/small.png", "--model", "{model}", "--out", "{tmp}/x.png"], "same size"),
    (["inpaint", "{odd}", "--box", "0,0,4,4", "--model", "{model}", "--out", "{tmp}/x.png"], "multiples"),
    (["inpaint", "{image}", "--box", "0,0,40,4", "--model", "{model}", "--out", "{tmp}/x.png"], "box"),
    (["inpaint", "{image}", "--model", "{model}", "--out", "{tmp}/x.png"], "exactly one"),
    (["outpaint", "{image}", "--left", "3", "--model", "{model}", "--out", "{tmp}/x.png"], "multiples"),
    (["refine", "{image}", "--box", "0,0,4,4", "--strength", "2", "--model", "{model}", "--out", "{tmp}/x.png"],
     "strength"),
    (["describe", "no-such-preset"], "unknown preset"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--classes", ""], "--classes needs class names"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--classes", ","], "--classes needs class names"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--seed", "99999999999999999999999"], "--seed"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--device", "foo"], "unknown device 'foo'"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--batch-size", "-1"], "--batch-size"),
    (["sample", "{model}", "--out", "{tmp}/x.png", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["inpaint", "{text}", "--box", "0,0,4,4", "--model", "{model}", "--out", "{tmp}/x.png"], "not a readable image"),
    (["inpaint", "{image}", "--mask", "{empty}", "--model", "{model}", "--out", "{tmp}/x.png"], "not a readable image"),
    (["inpaint", "{image}", "--box", "0,0,4,4", "-n", "0", "--model", "{model}", "--out", "{tmp}/x.png"],
     "--num-images"),
    (["sample", "--out", "{tmp}/x.png", "--no-such-flag"], "No such option '--no-such-flag'"),
])
def test_bad_input_gives_exit_code_2_and_one_line(args, message, tiny_pipeline_dir, image_path, tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((15, 16, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    values = {"model": tiny_pipeline_dir, "tmp": tmp_path, "image": image_path, "odd": tmp_path / "odd.png",
              "text": tmp_path / "notes.png", "empty": tmp_path / "empty.png"}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert "Traceback" not in result.output


def test_evaluate_and_sweep_write_reports(tiny_pipeline_dir, tmp_path):
    from sundae.eval.classifier import ClassifierConfig, SmallClassifier

    classifier = tmp_path / "classifier"
    SmallClassifier(ClassifierConfig(in_channels=3, image_size=16, width=4, feature_dim=6)).save_pretrained(classifier)
    real = write_grey_images(tmp_path / "real", side=16, channels=3)
    out = tmp_path / "report.json"
    result = run("evaluate", tiny_pipeline_dir, "--real", real, "--extractor-path", classifier, "--num-samples", 10,
                 "--steps", 2, "--nearest-k", 2, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["num_fake"] == 10 and report["num_real"] == 12
    assert report["extractor"].startswith("classifier:") and report["sampling_options"]["steps"] == 2
    assert {"fid", "density", "coverage", "precision", "recall"} <= set(report["metrics"])
    result = run("sweep", tiny_pipeline_dir, "--real", real, "--extractor-path", classifier, "--num-samples", 8,
                 "--parameter", "steps", "--values", "1,2", "--nearest-k", 2, "--out-dir", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    assert len((tmp_path / "sweep" / "sweep.csv").read_text().splitlines()) == 3


def test_evaluate_refuses_a_feature_network_of_another_domain_before_sampling(tiny_pipeline_dir, tmp_path):
    """The shipped Fashion-MNIST classifier must not score a user's RGB model (it printed FID 44.8 on photos)."""
    real = write_grey_images(tmp_path / "real", side=16, channels=3)
    result = CliRunner().invoke(main, ["evaluate", str(tiny_pipeline_dir), "--real", str(real), "--num-samples", "4",
                                       "--out", str(tmp_path / "report.json")])
    assert result.exit_code == 2
    assert "grey 28x28 images of T-shirt/top" in result.output and "--extractor inception" in result.output
    assert "evaluate:" not in result.output and not (tmp_path / "report.json").exists()


def test_sweep_checks_matplotlib_before_any_sampling(tiny_pipeline_dir, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    result = CliRunner().invoke(main, ["sweep", str(tiny_pipeline_dir), "--real", str(tmp_path), "--parameter",
                                       "steps", "--values", "1,2", "--out-dir", str(tmp_path / "sweep")])
    assert result.exit_code == 2 and "pip install -e '.[eval]'" in result.output
    assert not (tmp_path / "sweep").exists()


def test_guidance_without_classes_cycles_through_every_class(tiny_pipeline_dir, tmp_path):
    result = run("sample", tiny_pipeline_dir, "--out", tmp_path / "g.png", "-n", 3, "--steps", 2, "--guidance", 2.0)
    assert result.exit_code == 0, result.output
    assert "cycling through the model's 3 classes" in result.output


def test_the_same_model_option_on_every_command_and_flag_names_in_errors(tiny_pipeline_dir, tmp_path):
    result = run("sample", "--model", tiny_pipeline_dir, "--out", tmp_path / "m.png", "-n", 1, "--steps", 1)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["sample", "--model", str(tiny_pipeline_dir), "--top-p", "2", "--out",
                                       str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "error: --top-p must be in (0, 1]" in result.output
    assert "sampling" not in result.output  # refused before the progress bar starts


def test_reconstruct_counts_only_the_readable_images(tmp_path):
    from sundae.config import VQGANConfig
    from sundae.tokenizer import VQGAN

    tokenizer = tmp_path / "tokenizer"
    VQGAN(VQGANConfig(resolution=16, in_channels=1, out_channels=1, channels=32, channel_multipliers=(1, 2),
                      num_res_blocks=1, attention_resolutions=(), z_channels=8, embed_dim=8,
                      codebook_size=16)).save_pretrained(tokenizer)
    images = write_grey_images(tmp_path / "images", side=16, count=6)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = run("reconstruct", tokenizer, images, "--out", tmp_path / "grid.png")
    assert result.exit_code == 0, result.output
    report = json.loads(re.search(r"\{\"tokenizer\".*\}", result.output).group(0))
    assert report["images"] == 6 and report["unreadable"] == 1  # not 7 with one image counted twice
    assert Image.open(tmp_path / "grid.png").size[1] == 2 * 16 + 3 * 2


def test_describe_without_a_preset_lists_them():
    result = run("describe")
    assert result.exit_code == 0
    assert "ffhq1024" in result.output and "M parameters" in result.output


def test_an_internal_error_is_not_disguised_as_bad_input(tiny_pipeline_dir, tmp_path, monkeypatch):
    from sundae import pipeline as pipeline_module

    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr(pipeline_module.SundaePipeline, "__call__", broken)
    result = CliRunner().invoke(main, ["sample", str(tiny_pipeline_dir), "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 1 and "internal error: ValueError: a bug deep inside" in result.output
    assert "error: a bug" not in result.output.replace("internal error: ValueError: a bug", "")


def test_the_shipped_default_model_samples_with_no_model_argument(tmp_path):
    out = tmp_path / "samples.png"
    result = run("sample", "--out", out, "-n", 2, "--steps", 3, "--classes", "Trouser")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2 * 28 + 3 * 2, 28 + 2 * 2)


def test_evaluate_on_the_shipped_default_with_its_dataset_extractor(tmp_path):
    real = write_grey_images(tmp_path / "real", side=28)
    out = tmp_path / "report.json"
    result = run("evaluate", "--real", real, "--num-samples", 10, "--steps", 2, "--nearest-k", 2, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["extractor"].startswith("classifier:") and report["model"].startswith("default@sha256:")
    assert report["num_fake"] == 10 and report["metrics"]["fid"] > 0


def test_shipped_models_by_name(tmp_path):
    listed = run("models")
    assert listed.exit_code == 0 and listed.output.startswith("fashion-mnist (default): Fashion-MNIST")
    emoji_line = listed.output.splitlines()[1]
    assert emoji_line.startswith("emoji: Noto Emoji + Twemoji") and "64x64, 16x16 tokens" in emoji_line
    assert "Apache-2.0" in emoji_line and "CC-BY-4.0" in emoji_line
    result = run("sample", "--model", "fashion-mnist", "--out", tmp_path / "s.png", "-n", 1, "--steps", 2)
    assert result.exit_code == 0, result.output
    result = run("sample", "--model", "emoji", "--out", tmp_path / "e.png", "-n", 2, "--steps", 2,
                 "--classes", "Food & Drink")
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "e.png")
    assert grid.mode == "RGB" and grid.size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    unknown = CliRunner().invoke(main, ["sample", "--model", "no-such-model", "--out", str(tmp_path / "x.png")])
    assert unknown.exit_code == 2 and "shipped: fashion-mnist, emoji" in unknown.output


def test_every_shipped_model_loads_and_all_weights_together_stay_within_60_mb():
    from sundae.models import SHIPPED_MODELS
    from sundae.pipeline import SundaePipeline

    assets = Path(main.callback.__globals__["__file__"]).parent / "assets"
    total = sum(path.stat().st_size for path in assets.rglob("*.safetensors"))
    assert total <= 60e6, f"shipped weights take {total / 1e6:.1f} MB"
    for model in SHIPPED_MODELS.values():
        pipe = SundaePipeline.from_pretrained(model.name, device="cpu")
        assert pipe.class_names and model.classifier.is_dir()
        assert json.loads((model.classifier / "config.json").read_text())["class_names"] == pipe.class_names


# --- the model directory and its scheduler defaults ---------------------------------------------


def file_bytes(folder) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_convert_model_moves_the_old_layout_to_the_new_one_bit_for_bit(old_layout_dir, scheduled_pipeline_dir,
                                                                      tmp_path):
    import torch

    from sundae.checkpoint import CONTENT_HASH_KEY, content_hash, read_weights, read_weights_header
    from sundae.config import SamplingOptions
    from sundae.pipeline import SundaePipeline, load_components

    before = file_bytes(old_layout_dir)
    refused = CliRunner().invoke(main, ["sample", str(old_layout_dir), "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 2
    assert f"convert it with `sundae convert-model {old_layout_dir} NEW_DIR`" in refused.output
    new = tmp_path / "new"
    converted = run("convert-model", old_layout_dir, new)
    assert converted.exit_code == 0 and f"wrote {new}" in converted.output
    assert file_bytes(old_layout_dir) == before  # never modified
    for old, moved in (("model.safetensors", "prior/model.safetensors"),
                       ("tokenizer/model.safetensors", "tokenizer/model.safetensors"),
                       ("config.json", "prior/config.json")):
        assert (new / moved).read_bytes() == before[Path(old)], moved
    for part in ("prior", "tokenizer"):  # the content hash in the metadata still matches the tensors
        _, metadata = read_weights_header(new / part / "model.safetensors")
        assert metadata[CONTENT_HASH_KEY] == content_hash(read_weights(new / part / "model.safetensors"))
    # the converted model samples exactly as the old one, loaded by the converter's own loader
    prior, tokenizer, data = load_components(old_layout_dir, old_layout_dir / "tokenizer", "cpu")
    old = SundaePipeline(prior, tokenizer, class_names=data["class_names"])
    pipe = SundaePipeline.from_pretrained(new, device="cpu")
    a, b = pipe(3, seed=4, class_labels=[0, 1, 2], output_type="pt"), old(3, seed=4, class_labels=[0, 1, 2],
                                                                          output_type="pt")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    assert pipe.sampling_defaults == SamplingOptions() and pipe.class_names == ["class0", "class1", "class2"]
    again = CliRunner().invoke(main, ["convert-model", str(old_layout_dir), str(new)])
    assert again.exit_code == 2 and "not empty" in again.output
    scheduler = scheduled_pipeline_dir / "scheduler" / "config.json"
    tuned = run("convert-model", old_layout_dir, tmp_path / "tuned", "--scheduler-from", scheduler)
    assert tuned.exit_code == 0, tuned.output
    assert SundaePipeline.from_pretrained(tmp_path / "tuned").sampling_defaults.steps == 7


def test_no_flags_sample_with_the_models_scheduler_and_flags_override(scheduled_pipeline_dir, image_path, tmp_path):
    from sundae.config import SamplingOptions
    from sundae.pipeline import SundaePipeline, box_mask

    pipe = SundaePipeline.from_pretrained(scheduled_pipeline_dir, device="cpu")

    def cli_images(*args) -> tuple[str, list[np.ndarray]]:
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        result = run(*args, "--out", folder / "grid.png", "--per-image-dir", folder)
        assert result.exit_code == 0, result.output
        return result.output, [np.asarray(Image.open(path)) for path in sorted(folder.glob("0*.png"))]

    expected = pipe(3, seed=5)  # no options: the scheduler's 7 steps, none stopping early
    output, images = cli_images("sample", scheduled_pipeline_dir, "-n", 3, "--seed", 5)
    assert expected.steps_taken.tolist() == [7, 7, 7] and "steps taken: mean 7.0, min 7, max 7" in output
    assert [image.tolist() for image in images] == [np.asarray(image).tolist() for image in expected.images]
    output, images = cli_images("sample", scheduled_pipeline_dir, "-n", 3, "--seed", 5, "--steps", 3)
    assert "min 3, max 3" in output
    overridden = pipe(3, seed=5, steps=3).images
    assert [image.tolist() for image in images] == [np.asarray(image).tolist() for image in overridden]
    # an edit: the model's steps with the low edit temperature, as the pipeline's inpaint
    output, images = cli_images("inpaint", image_path, "--box", "0,0,8,8", "--model", scheduled_pipeline_dir, "-n", 2)
    fills = pipe.inpaint(image_path, box_mask((16, 16), (0, 0, 8, 8)), num_images=2, seed=0)
    assert "steps taken [7, 7]" in output
    assert [image.tolist() for image in images] == [np.asarray(image).tolist() for image in fills.images]
    # every knob is a flag, built from SamplingOptions, whose help names where its default comes from
    help_text = " ".join(run("sample", "--help").output.split())
    assert all(FLAG_NAMES[name] in help_text for name in SamplingOptions.knobs())
    assert "Sampling steps T. [default: (the model's scheduler/config.json)]" in help_text
    assert "[default: (0.4: edits sample cold, §3.6)]" in " ".join(run("refine", "--help").output.split())


@pytest.mark.parametrize("flag, flips", [([], True), (["--no-flips"], False)])
def test_train_passes_flips_to_the_run(flag, flips, tmp_path, monkeypatch):
    """`sundae train --no-flips` reaches the run's config (the loop then opens the latents without flipped rows)."""
    import sundae.training.prior as prior_training

    configs = []

    class Finished:
        def summary(self, what: str) -> str:
            return f"{what}: captured"

    monkeypatch.setattr(prior_training, "train_prior", lambda config: configs.append(config) or Finished())
    (tmp_path / "latents").mkdir()
    result = run("train", tmp_path / "latents", "-o", tmp_path / "run", "--preset", "tiny", *flag)
    assert result.exit_code == 0, result.output
    assert [config.flips for config in configs] == [flips]
