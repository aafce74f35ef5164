"""FID: Inception feature statistics of image sets and the Frechet distance between them.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), for the mean and covariance
of the 2048-d Inception pool features of two image sets (`inception.py`). Features are
computed on device, batch-sharded over the mesh, and accumulated on the host in float64
(sums of x and x x^T), so N = 50,000 never needs 50,000 images or features in memory.

Statistics files are .npz with ``mu`` [2048] and ``sigma`` [2048, 2048] (float64), the
keys the original FID code and pytorch-fid use, so their published reference files load
here and ours load there. Images are compared as uint8 pictures: generated samples are
clamped and rounded to uint8 exactly as when written to PNG.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ddpm_jax import image_utils, inception, ops, sharding


class FIDError(ValueError):
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
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------- statistics files


def save_statistics(path: str, stats: FeatureStatistics, **metadata: Any) -> None:
    """Writes mu, sigma, the image count and string metadata (what was measured, how)."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=stats.mean(), sigma=stats.covariance(), num_images=stats.count,
             **{key: np.array(str(value)) for key, value in metadata.items()})
    image_utils.write_atomically(path, buffer.getvalue())


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(mu, sigma, metadata) of a statistics .npz (ours, pytorch-fid's or the original FID's)."""
    file = epath.Path(path)
    if not file.exists():
        raise FIDError(f"no FID statistics at {path}; compute them with "
                       "`python -m ddpm_jax.evaluate fid-stats --config=... --output=...`")
    with file.open("rb") as f, np.load(f) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise FIDError(f"{path} holds {data.files}, not FID statistics (mu, sigma)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        metadata = {key: str(data[key]) for key in data.files if key not in ("mu", "sigma")}
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the "
                       f"{dim}-d Inception pool statistics")
    return mu, sigma, metadata


# ------------------------------------------------------------------------------ features


class InceptionFeatures:
    """The FID Inception on a mesh: global image batches in, every host's features out."""

    def __init__(self, weights_path: str, mesh: jax.sharding.Mesh):
        graphdef, state = inception.load(weights_path)
        self.mesh = mesh
        self._state = jax.device_put(state, sharding.replicated(mesh))

        def features(state, images):
            if images.dtype != np.uint8:  # model-space samples: the PNG they would be written as
                images = image_utils.to_uint8(images)
            return nnx.merge(graphdef, state)(images)

        self._features = jax.jit(
            features, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
            out_shardings=sharding.batch_sharding(mesh), compiler_options=ops.compiler_options())

    def of_global(self, images: jax.Array) -> np.ndarray:
        """Features [B, 2048] of a global batch (uint8, or floats in [-1, 1]), on every host."""
        features = self._features(self._state, images)
        return np.asarray(multihost_utils.process_allgather(features, tiled=True))

    def statistics(self, read: Callable[[Sequence[int]], np.ndarray], count: int,
                   batch_size: int, progress: bool = False) -> FeatureStatistics:
        """Statistics of images 0..count-1, where `read(indices)` returns those uint8 images.

        Each global batch of `batch_size` (rounded up to the devices) is split over the
        processes; each reads only its own rows. Rows past `count` are padding and dropped.
        """
        processes, process = jax.process_count(), jax.process_index()
        local = sharding.padded_to_devices(batch_size, self.mesh) // processes
        global_size = local * processes
        stats = FeatureStatistics()
        starts: Iterable[int] = range(0, count, global_size)
        if progress and process == 0:
            from tqdm import tqdm

            starts = tqdm(starts, desc="inception", unit="batch")
        for start in starts:
            first = start + process * local
            indices = [min(i, count - 1) for i in range(first, first + local)]
            batch = jax.make_array_from_process_local_data(
                sharding.batch_sharding(self.mesh), np.asarray(read(indices), np.uint8))
            stats.update(self.of_global(batch)[: count - start])
        return stats

    def sample_statistics(self, sample_fn, params: Any, rng: jax.Array, count: int,
                          progress: bool = False, should_stop: Callable[[], bool] | None = None
                          ) -> FeatureStatistics | None:
        """Statistics of `count` samples from `sample_fn(params, rng, should_stop) -> [-1, 1]
        images` (`sampling.SampleFn`); None when `should_stop()` asked to stop.

        Batch i uses fold_in(rng, i); samples stay on device between sampler and Inception.
        """
        stats = FeatureStatistics()
        batch_size = sample_fn.num_images
        batches: Iterable[int] = range(-(-count // batch_size))
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            batches = tqdm(batches, desc="sampling + inception", unit="batch")
        for index in batches:
            images = sample_fn(params, jax.random.fold_in(rng, index), should_stop)
            if images is None:
                return None
            stats.update(self.of_global(images)[: count - index * batch_size])
        return stats


# Published FIDs are over 50,000 samples; FID is biased upward with fewer.
PUBLISHED_SAMPLE_COUNT = 50_000


def distance_to(stats: FeatureStatistics, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of accumulated statistics against reference statistics (mu, sigma); warns when
    the sample count makes it not comparable with published numbers."""
    if stats.count < inception.FEATURE_DIM:
        logging.warning("FID from %d images (< %d features): the covariance is rank-deficient "
                        "and the value is biased upward; use >= 10,000 for a comparable number",
                        stats.count, inception.FEATURE_DIM)
    elif stats.count < PUBLISHED_SAMPLE_COUNT:
        logging.warning("FID over %d samples: FID is biased upward with fewer than %d, so it "
                        "is not comparable with published numbers (it is with other FIDs "
                        "over %d)", stats.count, PUBLISHED_SAMPLE_COUNT, stats.count)
    return frechet_distance(stats.mean(), stats.covariance(), mu, sigma)
