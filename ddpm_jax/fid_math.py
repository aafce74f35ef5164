"""The host-side arithmetic of FID, Inception Score and KID, in float64 (`fid.py` runs the
Inception network and reads and writes the statistics).

* FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) of the streamed mean and
  covariance of two sets' pool features (`FeatureStatistics`, `frechet_distance`).
* Inception Score: the original code's 10 consecutive splits, from two sums per split
  (`InceptionScoreSums`).
* KID: the unbiased polynomial-kernel MMD over random feature subsets
  (`kernel_inception_distance`), from a subset of each stream chosen up front
  (`FeatureSubset`).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from ddpm_jax import inception
from ddpm_jax.core.errors import UserError


class FIDError(UserError):
    """A statistics file or image set that cannot be used for FID."""


# ------------------------------------------------------------------------------ math


class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64."""

    def __init__(self, dim: int = inception.FEATURE_DIM):
        self.count = 0
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features

    def mean(self) -> np.ndarray:
        return self._sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased (N - 1) covariance, as `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise FIDError(f"a covariance needs at least 2 images, got {self.count}")
        mean = self.mean()
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which stays real
    and stable where a general matrix square root of S1 S2 needs an offset or drops an
    imaginary part.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    for side, arrays in (("the samples'", (mu1, sigma1)), ("the reference", (mu2, sigma2))):
        if not all(np.isfinite(a).all() for a in arrays):
            raise FIDError(f"{side} statistics hold NaN or infinite values: no FID can be "
                           "computed (samples from diverged weights, or a damaged file)")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


IS_SPLITS = 10  # the original Inception Score code's
KID_SUBSETS = 100  # torch-fidelity's default (the KID paper's code draws 50)
KID_SUBSET_SIZE = 1000  # both codes'
KID_FEATURES = 10_000  # features kept per image set for KID: 10 full subsets' worth


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class InceptionScoreSums:
    """The sums that give the Inception Score of a set of `count` images, fed in order.

    Split k holds images k*N//S .. (k+1)*N//S - 1 (the original code's cut). Its score
    exp(mean_x sum_y p log p - sum_y pbar log pbar), pbar the split's mean p(y|x), is the
    exponent of the mean KL(p(y|x) || pbar), so two sums per split are all it needs.
    """

    def __init__(self, count: int, num_classes: int = inception.NUM_CLASSES,
                 splits: int = IS_SPLITS):
        if not 1 <= splits <= count:
            raise FIDError(f"an Inception Score over {splits} splits needs at least {splits} "
                           f"images, got {count}")
        self.count, self.splits, self.seen = count, splits, 0
        self._probabilities = np.zeros((splits, num_classes), np.float64)
        self._negative_entropy = np.zeros(splits, np.float64)

    def update(self, probabilities: np.ndarray) -> None:
        """Adds the class probabilities [B, classes] of the next B images."""
        probabilities = np.asarray(probabilities, np.float64)
        index = np.arange(self.seen, self.seen + len(probabilities))
        split = np.searchsorted(self._bounds(), index, side="right") - 1
        np.add.at(self._probabilities, split, probabilities)
        plogp = np.where(probabilities > 0, probabilities * np.log(np.where(
            probabilities > 0, probabilities, 1.0)), 0.0)
        np.add.at(self._negative_entropy, split, plogp.sum(axis=-1))
        self.seen += len(probabilities)

    def _bounds(self) -> np.ndarray:
        return np.array([k * self.count // self.splits for k in range(self.splits + 1)])

    def score(self) -> tuple[float, float]:
        """(mean, standard deviation) of the splits' Inception Scores."""
        if self.seen != self.count:
            raise FIDError(f"Inception Score sums hold {self.seen} of {self.count} images")
        sizes = np.diff(self._bounds()).astype(np.float64)
        mean_p = self._probabilities / sizes[:, None]
        cross = np.where(mean_p > 0, mean_p * np.log(np.where(mean_p > 0, mean_p, 1.0)), 0.0)
        scores = np.exp(self._negative_entropy / sizes - cross.sum(axis=-1))
        return float(scores.mean()), float(scores.std())


def inception_score(probabilities: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) Inception Score of class probabilities [N, classes] of N images."""
    sums = InceptionScoreSums(len(probabilities), probabilities.shape[-1], splits)
    sums.update(probabilities)
    return sums.score()


def polynomial_mmd_squared(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD of two equal-size feature sets under (x.y / d + 1)^3."""
    m, dim = x.shape

    def kernel(a, b):  # float32 products (BLAS), float64 from the cube on
        return (np.asarray(a @ b.T, np.float64) / dim + 1.0) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diagonal - 2.0 * k_xy.mean())


def kernel_inception_distance(features: np.ndarray, reference: np.ndarray,
                              num_subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                              seed: int = 0) -> tuple[float, float, int]:
    """(mean, std, subset size) of the KID over `num_subsets` random subsets of each set.

    Subsets have `subset_size` features, or all of the smaller set's when it has fewer
    (a warning says the value is then not comparable with published KIDs).
    """
    size = min(subset_size, len(features), len(reference))
    if size < 2:
        raise FIDError(f"KID needs at least 2 features on each side, got {len(features)} and "
                       f"{len(reference)}")
    if size < subset_size:
        logging.warning("KID over subsets of %d features (fewer than the usual %d): not "
                        "comparable with published KIDs", size, subset_size)
    rng = np.random.default_rng(seed)
    features, reference = np.asarray(features, np.float32), np.asarray(reference, np.float32)
    values = [polynomial_mmd_squared(features[rng.choice(len(features), size, replace=False)],
                                     reference[rng.choice(len(reference), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values)), size


class FeatureSubset:
    """A random subset of `keep` of the feature vectors of `count` images fed in order:
    which images is fixed up front by `seed`, so it needs no more memory than it keeps."""

    def __init__(self, count: int, keep: int = KID_FEATURES, seed: int = 0):
        self._chosen = np.sort(np.random.default_rng(seed).choice(
            count, min(count, keep), replace=False))
        self._kept: list[np.ndarray] = []
        self.seen = 0

    def update(self, features: np.ndarray) -> None:
        lo, hi = np.searchsorted(self._chosen, (self.seen, self.seen + len(features)))
        self._kept.append(np.asarray(features, np.float32)[self._chosen[lo:hi] - self.seen])
        self.seen += len(features)

    def features(self) -> np.ndarray:
        """The kept features [keep, dim], float32."""
        return np.concatenate(self._kept) if self._kept else np.zeros((0, 0), np.float32)
