"""FID, FID∞ and the k-NN metrics against closed forms, hand computations and the reference ``prdc``."""

import numpy as np
import pytest
from prdc import compute_prdc  # the reference implementation of Naeem et al. (a test dependency)

from sundae.eval import metrics
from sundae.eval.metrics import (FeatureError, default_sample_counts, density_coverage, extrapolate_to_infinity,
                                 fid_from_features, fid_infinity, frechet_distance, gaussian_statistics,
                                 precision_recall, precision_recall_density_coverage)


def random_covariance(rng: np.random.Generator, dimension: int) -> np.ndarray:
    factor = rng.standard_normal((dimension, dimension))
    return factor @ factor.T / dimension + 0.5 * np.eye(dimension)


def closed_form_fid(mean1, covariance1, mean2, covariance2) -> float:
    """||m1 - m2||² + Tr(S1 + S2 - 2 (S1 S2)^½), with Tr (S1 S2)^½ = Σ sqrt(eig(S1^½ S2 S1^½))."""
    values, vectors = np.linalg.eigh(covariance1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ covariance2 @ root1), 0, None)).sum()
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(covariance1) + np.trace(covariance2) - 2 * cross)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mean1, mean2 = rng.standard_normal(6), rng.standard_normal(6)
    covariance1, covariance2 = random_covariance(rng, 6), random_covariance(rng, 6)
    assert frechet_distance(mean1, covariance1, mean2, covariance2) == pytest.approx(
        closed_form_fid(mean1, covariance1, mean2, covariance2), rel=1e-9)
    # diagonal covariances: Σ (sqrt(a) - sqrt(b))²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3.0 + 2.0, rel=1e-12)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    mean1, mean2 = np.zeros(3), np.array([1.0, -0.5, 0.0])
    covariance1, covariance2 = random_covariance(rng, 3), random_covariance(rng, 3)
    real = rng.multivariate_normal(mean1, covariance1, size=200_000)
    fake = rng.multivariate_normal(mean2, covariance2, size=200_000)
    expected = closed_form_fid(mean1, covariance1, mean2, covariance2)
    assert expected > 1.0
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=0.01)


def test_fid_of_a_set_with_itself_is_zero_and_statistics_are_float64():
    features = np.random.default_rng(2).standard_normal((500, 16)).astype(np.float32)
    assert abs(fid_from_features(features, features)) < 1e-8
    mean, covariance = gaussian_statistics(features)
    assert mean.dtype == covariance.dtype == np.float64 and covariance.shape == (16, 16)


def test_fid_with_fewer_samples_than_dimensions_stays_finite():
    rng = np.random.default_rng(3)
    value = fid_from_features(rng.standard_normal((6, 20)), rng.standard_normal((6, 20)) + 1.0)
    assert np.isfinite(value) and value > 15.0  # the mean term alone is 20


def test_extrapolation_recovers_the_intercept_of_a_one_over_n_trend():
    counts = [500, 1000, 2000, 4000, 8000]
    intercept, slope = extrapolate_to_infinity(counts, [3.25 + 1700.0 / n for n in counts])
    assert intercept == pytest.approx(3.25, abs=1e-9) and slope == pytest.approx(1700.0, rel=1e-9)


def test_fid_infinity_removes_the_finite_sample_bias():
    """Fake features drawn from the real distribution: FID at N is bias only (≈ D/N + D(D+1)/4N), FID∞ ≈ 0."""
    dimension = 16
    fake = np.random.default_rng(0).standard_normal((4000, dimension))
    value, points = fid_infinity((np.zeros(dimension), np.eye(dimension)), fake, seed=0)
    counts = [count for count, _ in points]
    assert counts == default_sample_counts(4000, dimension) and counts[0] == 800 and counts[-1] == 4000
    fids = dict(points)
    expected_bias = dimension / 4000 + dimension * (dimension + 1) / (4 * 4000)
    assert fids[4000] == pytest.approx(expected_bias, rel=0.3)
    assert fids[800] > 3 * fids[4000]  # the bias falls like 1/N
    assert abs(value) < 0.3 * fids[4000]


def test_fid_infinity_is_seeded_and_accepts_features_or_statistics():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((600, 4)), rng.standard_normal((300, 4)) + 0.2
    first = fid_infinity(real, fake, sample_counts=[50, 100, 200, 300], seed=5)
    assert first == fid_infinity(gaussian_statistics(real), fake, sample_counts=[50, 100, 200, 300], seed=5)
    assert first[0] != fid_infinity(real, fake, sample_counts=[50, 100, 200, 300], seed=6)[0]
    with pytest.raises(FeatureError, match=r"subset sizes must lie in \[2, 300\]"):
        fid_infinity(real, fake, sample_counts=[50, 400])
    with pytest.raises(FeatureError, match="needs at least 2050 fake samples"):
        default_sample_counts(2000, 1024)


def test_density_and_coverage_match_a_hand_computation():
    # k = 1 radii: r0 -> r1 = 2, r1 -> r0 = 2, r2 -> r0 = 4.
    real = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    # f0 lies in the balls of r0 and r1 (distances 1, 1), f1 in none (9, sqrt 85, 5), f2 in none.
    fake = np.array([[1.0, 0.0], [0.0, 9.0], [10.0, 10.0]])
    scores = precision_recall_density_coverage(real, fake, k=1)
    assert scores["density"] == pytest.approx((2 + 0 + 0) / 3)  # (1/k) mean over fakes of balls containing them
    assert scores["coverage"] == pytest.approx(2 / 3)  # r0, r1 hold a fake; r2 (radius 4, nearest fake 5) does not
    assert scores["precision"] == pytest.approx(1 / 3)
    # fake radii (k = 1): f0 sqrt 82, f1 sqrt 82, f2 sqrt 101; every real point is within sqrt 82 of f0
    assert scores["recall"] == pytest.approx(1.0)
    assert density_coverage(real, fake, k=1) == {"density": scores["density"], "coverage": scores["coverage"]}
    assert precision_recall(real, fake, k=1) == {"precision": scores["precision"], "recall": scores["recall"]}


@pytest.mark.parametrize("chunk_elements", [metrics.DISTANCE_CHUNK_ELEMENTS, 1000])
def test_knn_metrics_match_the_reference_prdc_package(monkeypatch, chunk_elements):
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK_ELEMENTS", chunk_elements)  # also across chunk boundaries
    rng = np.random.default_rng(7)
    real = rng.standard_normal((400, 24))
    fake = 1.2 * rng.standard_normal((350, 24)) + 0.15
    expected = compute_prdc(real, fake, nearest_k=5)
    scores = precision_recall_density_coverage(real, fake, k=5)
    assert set(scores) == set(expected)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(float(value), abs=1e-12), name
    assert 0.1 < scores["coverage"] < 0.99 and 0.1 < scores["precision"] < 0.99  # a non-degenerate comparison


def test_density_is_about_one_for_samples_from_the_real_distribution():
    rng = np.random.default_rng(8)
    scores = density_coverage(rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)), k=5)
    assert scores["density"] == pytest.approx(1.0, abs=0.08)
    assert scores["coverage"] > 0.9


def test_bad_features_give_clear_errors():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((50, 8)), rng.standard_normal((50, 6))
    with pytest.raises(FeatureError, match="8 dimensions but fake features have 6"):
        fid_from_features(real, fake)
    with pytest.raises(FeatureError, match="same feature extractor"):
        density_coverage(real, fake)
    with pytest.raises(FeatureError, match="needs at least 6 fake samples, got 5"):
        density_coverage(real, rng.standard_normal((5, 8)), k=5)
    with pytest.raises(FeatureError, match="FID needs at least 2 real samples, got 1"):
        fid_from_features(real[:1], real)
    broken = real.copy()
    broken[3, 2] = np.nan
    with pytest.raises(FeatureError, match=r"NaN or infinite values \(1 of 50 rows\)"):
        fid_from_features(broken, real)
    with pytest.raises(FeatureError, match="must be a 2-D array"):
        precision_recall(real[0], real)
    with pytest.raises(FeatureError, match="k .* must be >= 1"):
        precision_recall(real, real, k=0)
    with pytest.raises(FeatureError, match="different feature extractors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
