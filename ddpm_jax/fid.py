"""FID, Inception Score and KID of image sets, from the FID Inception network.

* FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), for the mean and
  covariance of the 2048-d Inception pool features of two image sets (`inception.py`).
* Inception Score (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))) over the 1008 classes
  of the same network, computed as the original IS code does: the softmax of the pool
  features times the classifier's weight (no bias), the images cut in 10 consecutive
  splits, the mean and standard deviation of the splits' scores.
* KID (Binkowski et al. 2018): the unbiased squared MMD between the two feature sets under
  the polynomial kernel k(x, y) = (x.y / 2048 + 1)^3, averaged over random subsets of 1,000
  features from each set (100 subsets, as torch-fidelity); mean and standard deviation.

Features are computed on device, batch-sharded over the mesh, and accumulated on the host
in float64 (sums of x and x x^T, per-split class sums; the arithmetic is in `fid_math.py`),
so N = 50,000 never needs 50,000 images or features in memory; KID keeps a random subset of
10,000 features per set.

Statistics files are .npz with ``mu`` [2048] and ``sigma`` [2048, 2048] (float64), the
keys the original FID code and pytorch-fid use, so their published reference files load
here and ours load there; ours also hold ``kid_features`` (the random subset, float32) for
KID. Images are compared as uint8 pictures: generated samples are clamped and rounded to
uint8 exactly as when written to PNG.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ddpm_jax import image_utils, inception, ops
from ddpm_jax import progress as progress_bars
from ddpm_jax.fid_math import (
    IS_SPLITS,
    KID_FEATURES,
    FeatureStatistics,
    FeatureSubset,
    FIDError,
    InceptionScoreSums,
    class_probabilities,
    frechet_distance,
    kernel_inception_distance,
)
from ddpm_jax.runtime import compiled_sampler, sharding
from ddpm_jax.samplers import SamplerSettings


class ImageSetScores:
    """What the Inception network says of a set of `count` images, fed batch by batch in
    order: pool-feature statistics (FID), Inception Score sums, a feature subset (KID)."""

    def __init__(self, count: int, keep_features: int = KID_FEATURES, seed: int = 0):
        self.features = FeatureStatistics()
        # fewer images than splits (small test sets): one image per split
        self.inception_score_sums = InceptionScoreSums(count, splits=min(IS_SPLITS, count))
        self.kid_subset = FeatureSubset(count, keep_features, seed)

    @property
    def count(self) -> int:
        return self.features.count

    def update(self, features: np.ndarray, logits: np.ndarray) -> None:
        self.features.update(features)
        self.inception_score_sums.update(class_probabilities(logits))
        self.kid_subset.update(features)

    def inception_score(self) -> tuple[float, float]:
        return self.inception_score_sums.score()


# ----------------------------------------------------------------------- statistics files


def save_statistics(path: str, stats: FeatureStatistics, kid_features: np.ndarray | None = None,
                    **metadata: Any) -> None:
    """Writes mu, sigma, the image count, the features kept for KID (if given) and string
    metadata (what was measured, how)."""
    buffer = io.BytesIO()
    arrays = {} if kid_features is None else {"kid_features": np.asarray(kid_features, np.float32)}
    np.savez(buffer, mu=stats.mean(), sigma=stats.covariance(), num_images=stats.count, **arrays,
             **{key: np.array(str(value)) for key, value in metadata.items()})
    image_utils.write_atomically(path, buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class Reference:
    """A statistics file: what FID and KID compare samples with."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray | None  # None in files of other tools (and ours before KID)
    metadata: dict[str, str]


def load_reference(path: str) -> Reference:
    """The statistics .npz at `path` (ours, pytorch-fid's or the original FID code's)."""
    file = epath.Path(path)
    if not file.exists():
        raise FIDError(f"no FID statistics at {path}; compute them with "
                       "`python -m ddpm_jax.evaluate fid-stats --config=... --output=...`")
    with file.open("rb") as f, np.load(f) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise FIDError(f"{path} holds {data.files}, not FID statistics (mu, sigma)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        kid = data["kid_features"].astype(np.float32) if "kid_features" in data.files else None
        arrays = ("mu", "sigma", "kid_features")
        metadata = {key: str(data[key]) for key in data.files if key not in arrays}
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the "
                       f"{dim}-d Inception pool statistics")
    if kid is not None and (kid.ndim != 2 or kid.shape[1] != dim):
        raise FIDError(f"{path}: kid_features {kid.shape} are not {dim}-d Inception features")
    count = metadata.get("num_images")
    if count is not None and count.lstrip("-").isdigit() and int(count) < 2:
        raise FIDError(f"{path} holds statistics of {count} images; a covariance needs at least "
                       "2: compute them again over more images (fid-stats --num_images)")
    for name, values in (("mu", mu), ("sigma", sigma), ("kid_features", kid)):
        if values is not None and not np.isfinite(values).all():
            raise FIDError(f"{path}: {name} holds {int((~np.isfinite(values)).sum())} NaN or "
                           "infinite values, so every score against it would be NaN; the file "
                           "is damaged: compute it again with `ddpm_jax.evaluate fid-stats`")
    return Reference(path, mu, sigma, kid, metadata)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(mu, sigma, metadata) of a statistics .npz (ours, pytorch-fid's or the original FID's)."""
    reference = load_reference(path)
    return reference.mu, reference.sigma, reference.metadata


# ------------------------------------------------------------------------------ features


class InceptionFeatures:
    """The FID Inception on a mesh: global image batches in, every host's features and
    class logits out."""

    def __init__(self, weights_path: str, mesh: jax.sharding.Mesh):
        graphdef, state = inception.load(weights_path)
        self.mesh = mesh
        self._state = jax.device_put(state, sharding.replicated(mesh))

        def outputs(state, images):
            if images.dtype != np.uint8:  # model-space samples: the PNG they would be written as
                images = image_utils.to_uint8(images)
            network = nnx.merge(graphdef, state)
            features = network(images)
            return features, network.logits(features)

        self._outputs = jax.jit(
            outputs, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
            out_shardings=sharding.batch_sharding(mesh), compiler_options=ops.compiler_options())

    def outputs_of_global(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """(features [B, 2048], IS logits [B, 1008]) of a global batch (uint8, or floats in
        [-1, 1]), on every host."""
        outputs = multihost_utils.process_allgather(self._outputs(self._state, images), tiled=True)
        return np.asarray(outputs[0]), np.asarray(outputs[1])

    def of_global(self, images: jax.Array) -> np.ndarray:
        """Features [B, 2048] of a global batch (uint8, or floats in [-1, 1]), on every host."""
        return self.outputs_of_global(images)[0]

    def statistics(self, read: Callable[[Sequence[int]], np.ndarray], count: int,
                   batch_size: int, progress: bool = False) -> ImageSetScores:
        """Scores of images 0..count-1, where `read(indices)` returns those uint8 images.

        Each global batch of `batch_size` (rounded up to the devices) is split over the
        processes; each reads only its own rows. Rows past `count` are padding and dropped.
        """
        processes, process = jax.process_count(), jax.process_index()
        local = sharding.padded_to_devices(batch_size, self.mesh) // processes
        global_size = local * processes
        scores = ImageSetScores(count)
        with progress_bars.bar(count, "inception", "image", progress) as bar:
            for start in range(0, count, global_size):
                first = start + process * local
                indices = [min(i, count - 1) for i in range(first, first + local)]
                batch = jax.make_array_from_process_local_data(
                    sharding.batch_sharding(self.mesh), np.asarray(read(indices), np.uint8))
                features, logits = self.outputs_of_global(batch)
                scores.update(features[: count - start], logits[: count - start])
                bar.update(min(global_size, count - start))
        return scores

    def sample_statistics(self, sample_fn, params: Any, rng: jax.Array, count: int,
                          progress: bool = False, should_stop: Callable[[], bool] | None = None,
                          labels: np.ndarray | None = None) -> ImageSetScores | None:
        """Scores of `count` samples from `sample_fn(params, rng, should_stop) -> [-1, 1]
        images` (`sampling.SampleFn`); None when `should_stop()` asked to stop.

        Batch i uses fold_in(rng, i), and of a class-conditional model the classes
        `labels[i * B:(i + 1) * B]`; samples stay on device between sampler and Inception.
        """
        scores = ImageSetScores(count)
        batch_size = sample_fn.num_images
        with progress_bars.bar(count, "sampling + inception", "image", progress) as bar:
            for index in range(-(-count // batch_size)):
                classes = ({} if labels is None else
                           {"labels": labels[index * batch_size:(index + 1) * batch_size]})
                images = sample_fn(params, jax.random.fold_in(rng, index), should_stop, **classes)
                # a stop that came during the batch's last chunk skips its Inception pass
                if images is None or (should_stop is not None and should_stop()):
                    return None
                features, logits = self.outputs_of_global(images)
                kept = min(batch_size, count - index * batch_size)
                scores.update(features[:kept], logits[:kept])
                bar.update(kept)
        return scores


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


def compare(scores: ImageSetScores, reference: Reference) -> dict[str, Any]:
    """FID and KID of scored samples against `reference`, and their Inception Score.

    KID is None (with `kid_note` saying why) when the reference file holds no features:
    statistics files of other tools, or ours from before KID.
    """
    result: dict[str, Any] = {"fid": distance_to(scores.features, reference.mu, reference.sigma)}
    result["inception_score"], result["inception_score_std"] = scores.inception_score()
    if reference.kid_features is None:
        result.update(kid=None, kid_std=None, kid_note=(
            f"{reference.path} holds no kid_features; rerun `ddpm_jax.evaluate fid-stats` for KID"))
    else:
        result["kid"], result["kid_std"], result["kid_subset_size"] = kernel_inception_distance(
            scores.kid_subset.features(), reference.kid_features)
    return result


def describe(result: dict[str, Any]) -> str:
    """One line of the scores in `result` (`compare`'s keys)."""
    parts = [f"FID {result['fid']:.4f}",
             f"IS {result['inception_score']:.3f} +- {result['inception_score_std']:.3f}"]
    if result.get("kid") is not None:
        parts.append(f"KID {result['kid']:.5f} +- {result['kid_std']:.5f}")
    return ", ".join(parts)


def make_sample_fid_fn(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, settings: SamplerSettings, *,
    weights: str | InceptionFeatures, reference: str, num_samples: int, batch_size: int,
    progress: bool = False, class_counts: list[int] | None = None,
):
    """`fn(params, rng, should_stop=None) -> scores` of `num_samples` samples against
    `reference` (`compare`'s FID, IS and KID, and `num_images`), or None when
    `should_stop()` asked to stop. A class-conditional model's samples have the classes
    `eval.class_distribution` says (`class_labels`; "data" reads `class_counts`).

    Loads the Inception (`weights`: a path, or loaded) and reference statistics first (a
    wrong path fails before any sampling); samples go to the Inception network on device.
    """
    reference_stats = load_reference(reference)
    labels = None
    if config.model.get("num_classes", 0):
        labels = compiled_sampler.class_labels(config.model.num_classes, num_samples,
                                               config.eval.get("class_distribution", "uniform"),
                                               class_counts)
    features = weights if isinstance(weights, InceptionFeatures) else InceptionFeatures(weights, mesh)
    sample_fn = compiled_sampler.make_sample_fn(config, mesh, settings,
                                                num_images=min(batch_size, num_samples))

    def evaluate(params: Any, rng: jax.Array, should_stop: Callable[[], bool] | None = None
                 ) -> dict[str, Any] | None:
        scores = features.sample_statistics(sample_fn, params, rng, num_samples, progress,
                                            should_stop, labels)
        if scores is None:
            return None
        return {**compare(scores, reference_stats), "num_images": scores.count}

    return evaluate
