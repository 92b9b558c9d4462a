"""Sample-quality metrics on feature vectors: FID, FID∞, precision/recall, density/coverage.

The paper reports FID∞ with density and coverage (§4.1, Tables 1-2, Figs. 8, 12, 13):

* FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to real and generated
  features, ``||mu_r - mu_g||² + Tr(S_r + S_g - 2 (S_r S_g)^½)``.
* FID∞ (Chong & Forsyth 2020, §3): FID is biased upwards by a term ~ 1/N in the number of
  generated samples N, so comparing models at a fixed N ranks them partly by that bias. FID is
  computed on random subsets of several sizes, fitted linearly against 1/N, and the fit is read
  at 1/N = 0.
* Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020, Eqs. 3-4):
  every real feature gets a ball whose radius is the distance to its k-th nearest real
  neighbour. Density counts how many real balls each fake sample falls in (divided by k, so 1.0
  for a fake set distributed like the real one); coverage is the share of real balls that hold
  at least one fake sample. Numbers match the reference ``prdc`` package.

All functions take numpy arrays of shape (N, D) and compute in float64. Distances are computed in
row chunks, so 10 000 × 10 000 comparisons never hold the full matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from sundae.errors import InputError

SQRTM_EPSILON = 1e-6  # diagonal offset that makes a singular covariance product invertible
MAX_IMAGINARY = 1e-3  # a larger imaginary part of sqrt(S1 S2) means the statistics are broken
DISTANCE_CHUNK_ELEMENTS = 1 << 25  # 256 MiB of float64 distances per chunk
FID_INFINITY_POINTS = 15  # Chong & Forsyth's default
FID_INFINITY_SMALLEST_COUNT = 5000  # their smallest subset size, used when N allows


class FeatureError(InputError):
    """Feature arrays that cannot be compared: wrong shape, different dimensions, NaN, too few rows."""


def check_features(features: np.ndarray, *, name: str, min_count: int, purpose: str) -> np.ndarray:
    """``features`` as a float64 (N, D) array, or a :class:`FeatureError` that says what is wrong."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise FeatureError(f"{name} features must be a 2-D array (samples, dimensions), got shape {array.shape}")
    if len(array) < min_count:
        raise FeatureError(f"{purpose} needs at least {min_count} {name} samples, got {len(array)}; "
                           "generate or load more samples")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise FeatureError(f"{name} features contain NaN or infinite values ({bad} of {len(array)} rows); "
                           "the images or the feature network are broken")
    return array


def check_same_dimension(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise FeatureError(f"real features have {real.shape[1]} dimensions but fake features have {fake.shape[1]}; "
                           "both sets must come from the same feature extractor")


# --- FID ---------------------------------------------------------------------------------------


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), unbiased covariance (D, D)), in float64."""
    array = check_features(features, name="input", min_count=2, purpose="a covariance")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _matrix_sqrt(matrix: np.ndarray) -> np.ndarray | None:
    """``sqrtm(matrix)``, or None when the matrix is singular (scipy warns) or the result is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(matrix)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def frechet_distance(mean1: np.ndarray, covariance1: np.ndarray, mean2: np.ndarray, covariance2: np.ndarray) -> float:
    """Fréchet distance between N(mean1, covariance1) and N(mean2, covariance2).

    ``sqrt(S1 S2)`` is computed with ``scipy.linalg.sqrtm`` as in the reference FID code. A
    singular product (fewer samples than dimensions, dead ReLU features) is retried with
    ``SQRTM_EPSILON`` added to both diagonals; round-off imaginary parts are dropped, a large one
    is an error.
    """
    mean1, mean2 = np.atleast_1d(mean1).astype(np.float64), np.atleast_1d(mean2).astype(np.float64)
    covariance1, covariance2 = np.atleast_2d(covariance1).astype(np.float64), np.atleast_2d(covariance2).astype(np.float64)
    dimension = mean1.shape[0]
    for label, value in (("mean2", mean2), ("covariance1", covariance1), ("covariance2", covariance2)):
        expected = (dimension,) if label.startswith("mean") else (dimension, dimension)
        if value.shape != expected:
            raise FeatureError(f"{label} has shape {value.shape} but mean1 implies {expected}; the statistics come "
                               "from different feature extractors")
    root = _matrix_sqrt(covariance1 @ covariance2)
    if root is None:
        offset = np.eye(dimension) * SQRTM_EPSILON
        root = scipy.linalg.sqrtm((covariance1 + offset) @ (covariance2 + offset))
    if np.iscomplexobj(root):
        largest = float(np.abs(np.diagonal(root).imag).max())
        if largest > MAX_IMAGINARY:
            raise FeatureError(f"sqrt(S1 S2) has an imaginary component of {largest:.3g}; the covariances are not "
                               "valid (too few samples, or NaN-like features)")
        root = root.real
    difference = mean1 - mean2
    return float(difference @ difference + np.trace(covariance1) + np.trace(covariance2) - 2.0 * np.trace(root))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N_real, D) and (N_fake, D)."""
    real = check_features(real, name="real", min_count=2, purpose="FID")
    fake = check_features(fake, name="fake", min_count=2, purpose="FID")
    check_same_dimension(real, fake)
    return frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))


# --- FID∞ --------------------------------------------------------------------------------------


def default_sample_counts(total: int, dimension: int, *, num_points: int = FID_INFINITY_POINTS) -> list[int]:
    """Subset sizes for FID∞: ``num_points`` sizes evenly spaced from the smallest to ``total``.

    The smallest is Chong & Forsyth's 5000 when ``total`` allows, else ``total // 5``, but never
    below ``dimension + 1``: with fewer samples than dimensions the covariance is singular and FID
    no longer falls like 1/N, so the extrapolation would be meaningless.
    """
    smallest = min(FID_INFINITY_SMALLEST_COUNT, max(total // 5, dimension + 1))
    if total < 2 * smallest:
        raise FeatureError(f"FID∞ with {dimension}-dimensional features needs at least {2 * (dimension + 1)} fake "
                           f"samples (subsets from {dimension + 1} to twice that), got {total}")
    return sorted({int(count) for count in np.linspace(smallest, total, num_points).round()})


def extrapolate_to_infinity(sample_counts: list[int] | np.ndarray, values: list[float] | np.ndarray) -> tuple[float, float]:
    """Least-squares fit ``value = intercept + slope / N``; returns (intercept, slope)."""
    inverse = 1.0 / np.asarray(sample_counts, dtype=np.float64)
    if len(np.unique(inverse)) < 2:
        raise FeatureError(f"the 1/N fit needs at least two different subset sizes, got {list(sample_counts)}")
    slope, intercept = np.polyfit(inverse, np.asarray(values, dtype=np.float64), deg=1)
    return float(intercept), float(slope)


def fid_infinity(real: np.ndarray | tuple[np.ndarray, np.ndarray], fake: np.ndarray, *,
                 sample_counts: list[int] | None = None, seed: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """FID∞ (Chong & Forsyth 2020): FID of random fake subsets of several sizes, extrapolated to N = ∞.

    Args:
        real: real features (N_real, D), or their precomputed ``(mean, covariance)``; the real
            statistics are fixed, only the fake set is subsampled.
        fake: generated features (N_fake, D).
        sample_counts: subset sizes (each <= N_fake); default :func:`default_sample_counts`.
        seed: seeds the subsets (a fresh permutation per size, as in the reference code).

    Returns:
        (FID∞, [(subset size, FID), ...]).
    """
    fake = check_features(fake, name="fake", min_count=2, purpose="FID∞")
    real_mean, real_covariance = real if isinstance(real, tuple) else gaussian_statistics(real)
    if np.shape(real_mean) != (fake.shape[1],):
        raise FeatureError(f"real features have {np.shape(real_mean)[0]} dimensions but fake features have "
                           f"{fake.shape[1]}; both sets must come from the same feature extractor")
    counts = default_sample_counts(len(fake), fake.shape[1]) if sample_counts is None else sorted(set(sample_counts))
    if counts[0] < 2 or counts[-1] > len(fake):
        raise FeatureError(f"FID∞ subset sizes must lie in [2, {len(fake)}] (the number of fake samples), got {counts}")
    rng = np.random.default_rng(seed)
    points = []
    for count in counts:
        subset = fake[rng.permutation(len(fake))[:count]]
        points.append((count, frechet_distance(real_mean, real_covariance, *gaussian_statistics(subset))))
    intercept, _ = extrapolate_to_infinity([count for count, _ in points], [value for _, value in points])
    return intercept, points


# --- precision, recall, density, coverage -------------------------------------------------------


def _chunk_size(columns: int) -> int:
    """Rows per chunk so that a (rows, columns) float64 block stays within DISTANCE_CHUNK_ELEMENTS."""
    return max(1, DISTANCE_CHUNK_ELEMENTS // max(columns, 1))


def _distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Euclidean distances (R, C), by the same expansion ``|x|² - 2 x·y + |y|²`` that sklearn/prdc use."""
    squared = (rows * rows).sum(axis=1)[:, None] - 2.0 * rows @ columns.T + (columns * columns).sum(axis=1)[None, :]
    return np.sqrt(np.maximum(squared, 0.0))


def nearest_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row, (N,).

    Like ``prdc``, this is the (k+1)-th smallest distance in the row, the row itself being the first.
    """
    radii = np.empty(len(features))
    size = _chunk_size(len(features))
    for start in range(0, len(features), size):
        block = _distances(features[start:start + size], features)
        radii[start:start + size] = np.partition(block, k, axis=1)[:, k]
    return radii


def _check_pair(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k < 1:
        raise FeatureError(f"k (the neighbourhood size) must be >= 1, got {k}")
    purpose = f"k-nearest-neighbour metrics with k={k}"
    real = check_features(real, name="real", min_count=k + 1, purpose=purpose)
    fake = check_features(fake, name="fake", min_count=k + 1, purpose=purpose)
    check_same_dimension(real, fake)
    return real, fake


def _manifold_metrics(real: np.ndarray, fake: np.ndarray, k: int, *, with_recall: bool) -> dict[str, float]:
    """One pass over real-row chunks of the real-fake distances accumulates all four metrics."""
    real_radii = nearest_neighbour_radii(real, k)
    fake_radii = nearest_neighbour_radii(fake, k) if with_recall else None
    balls_holding_fake = np.zeros(len(fake), dtype=np.int64)  # per fake: real balls it falls in
    covered = np.zeros(len(real), dtype=bool)  # per real: its ball holds a fake sample
    recalled = np.zeros(len(real), dtype=bool)  # per real: it falls in a fake ball
    size = _chunk_size(len(fake))
    for start in range(0, len(real), size):
        block = _distances(real[start:start + size], fake)  # (chunk, N_fake)
        inside = block < real_radii[start:start + size, None]
        balls_holding_fake += inside.sum(axis=0)
        covered[start:start + size] = inside.any(axis=1)
        if fake_radii is not None:
            recalled[start:start + size] = (block < fake_radii[None, :]).any(axis=1)
    metrics = {"precision": float((balls_holding_fake > 0).mean()), "density": float(balls_holding_fake.mean() / k),
               "coverage": float(covered.mean())}
    if with_recall:
        metrics["recall"] = float(recalled.mean())
    return metrics


def density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020, Eqs. 3-4) with ``k`` nearest neighbours."""
    real, fake = _check_pair(real, fake, k)
    metrics = _manifold_metrics(real, fake, k, with_recall=False)
    return {"density": metrics["density"], "coverage": metrics["coverage"]}


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k`` nearest neighbours."""
    real, fake = _check_pair(real, fake, k)
    metrics = _manifold_metrics(real, fake, k, with_recall=True)
    return {"precision": metrics["precision"], "recall": metrics["recall"]}


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """All four k-NN metrics in one pass: the keys and values of ``prdc.compute_prdc``."""
    real, fake = _check_pair(real, fake, k)
    return _manifold_metrics(real, fake, k, with_recall=True)
