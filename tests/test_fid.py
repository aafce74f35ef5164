"""FID: the Frechet distance, feature statistics, the Inception network and its weight file,
the evaluate command end to end, and FID during training."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from ddpm_jax import evaluate, fid, fid_math, inception, train
from ddpm_jax.runtime import compiled_sampler
from ddpm_jax.train import config_checks
from tests.helpers import ROOT, command_env, micro_config, read_scalars

# ------------------------------------------------------------------ the Frechet distance


def reference_frechet(mu1, sigma1, mu2, sigma2):
    """The textbook formula with a general matrix square root (scipy), in float64."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def gaussian_features(rng, n, dim, shift=0.0, scale=1.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) @ mixing) * scale + shift


def moments(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    a = gaussian_features(rng, 2000, 128)
    b = gaussian_features(rng, 2000, 128, shift=0.3, scale=1.5)
    ours = fid_math.frechet_distance(*moments(a), *moments(b))
    reference = reference_frechet(*moments(a), *moments(b))
    assert ours > 1.0
    assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_a_set_against_itself_is_zero_and_a_mean_shift_adds_its_squared_norm():
    rng = np.random.default_rng(1)
    mu, sigma = moments(gaussian_features(rng, 1000, 64))
    assert abs(fid_math.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    direction = rng.normal(size=64)
    values = [fid_math.frechet_distance(mu, sigma, mu + d * direction, sigma) for d in (0.1, 0.5, 1, 2)]
    # Same covariance: FID is exactly the squared distance of the means, growing with it.
    np.testing.assert_allclose(values, [(d ** 2) * direction @ direction for d in (0.1, 0.5, 1, 2)],
                               rtol=1e-7)
    assert values == sorted(values)


def test_streamed_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(2)
    features = gaussian_features(rng, 301, 16, shift=5.0).astype(np.float32)
    stats = fid_math.FeatureStatistics(16)
    for start, stop in ((0, 7), (7, 200), (200, 301)):
        stats.update(features[start:stop])
    np.testing.assert_allclose(stats.mean(), features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)


def test_statistics_files_round_trip_and_foreign_files_load(tmp_path):
    rng = np.random.default_rng(3)
    stats = fid_math.FeatureStatistics()
    stats.update(rng.normal(size=(10, inception.FEATURE_DIM)))
    fid.save_statistics(str(tmp_path / "ours.npz"), stats, dataset="faces", image_size=32)
    mu, sigma, metadata = fid.load_statistics(str(tmp_path / "ours.npz"))
    np.testing.assert_array_equal(mu, stats.mean())
    np.testing.assert_array_equal(sigma, stats.covariance())
    assert metadata["dataset"] == "faces" and metadata["num_images"] == "10"
    np.savez(tmp_path / "pytorch_fid_style.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert fid.load_statistics(str(tmp_path / "pytorch_fid_style.npz"))[0].dtype == np.float64
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(fid_math.FIDError, match="2048-d"):
        fid.load_statistics(str(tmp_path / "small.npz"))
    with pytest.raises(fid_math.FIDError, match="fid-stats"):
        fid.load_statistics(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("damage, match", [
    (lambda mu, sigma: mu.__setitem__(0, np.nan), "mu holds 1 NaN or infinite values"),
    (lambda mu, sigma: sigma.__setitem__((3, 4), np.inf), "sigma holds 1 NaN or infinite values"),
])
def test_reference_statistics_with_nan_or_inf_are_refused(tmp_path, damage, match):
    dim = inception.FEATURE_DIM
    mu, sigma = np.zeros(dim), np.eye(dim)
    damage(mu, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma)
    with pytest.raises(fid_math.FIDError, match=match):
        fid.load_reference(str(tmp_path / "bad.npz"))
    # and the distance itself refuses non-finite statistics rather than returning nan
    with pytest.raises(fid_math.FIDError, match="NaN or infinite"):
        fid_math.frechet_distance(np.zeros(dim), np.eye(dim), mu, sigma)


def test_statistics_of_fewer_than_two_images_are_refused(tmp_path):
    dim = inception.FEATURE_DIM
    np.savez(tmp_path / "empty.npz", mu=np.zeros(dim), sigma=np.zeros((dim, dim)),
             num_images=np.array("0"))
    with pytest.raises(fid_math.FIDError, match="statistics of 0 images; a covariance needs at least 2"):
        fid.load_reference(str(tmp_path / "empty.npz"))


def test_results_are_written_as_strict_json_or_refused():
    import json

    assert json.loads(evaluate.strict_json({"fid": 1.5, "num_images": 3})) == {"fid": 1.5,
                                                                               "num_images": 3}
    with pytest.raises(ValueError, match="non-finite fid"):
        evaluate.strict_json({"fid": float("nan"), "num_images": 3})


def test_an_output_that_cannot_be_written_is_saved_elsewhere_and_the_message_says_where(
        tmp_path, monkeypatch):
    import errno
    import tempfile

    from etils import epath

    from ddpm_jax import image_utils

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    original = epath.Path.write_bytes

    def full_disk(self, data):
        if "disk" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(epath.Path, "write_bytes", full_disk)
    with pytest.raises(image_utils.OutputWriteError) as caught:
        image_utils.write_atomically(tmp_path / "disk" / "stats.npz", b"the work")
    message = str(caught.value)
    assert message.startswith(f"could not write {tmp_path}/disk/stats.npz (No space left on device); "
                              "the result is saved at ")
    rescued = message.split("saved at ")[1].split(" instead")[0]
    assert rescued.startswith(image_utils.rescue_folder()) and rescued.endswith(".npz")
    assert open(rescued, "rb").read() == b"the work"
    assert os.listdir(tmp_path / "disk") == []  # no partial or staged file left


# ---------------------------------------------------------------- Inception Score and KID


def original_inception_score(probabilities, splits=10):
    """The original IS code's loop, written out: consecutive splits, KL to the split's mean."""
    scores = []
    n = len(probabilities)
    for k in range(splits):
        part = probabilities[k * n // splits:(k + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_closed_forms():
    classes = 1008
    # Each image certain of one class, 20 classes equally often in every split: IS = 20.
    one_hot = np.eye(classes)[np.arange(1000) % 20]
    assert fid_math.inception_score(one_hot) == pytest.approx((20.0, 0.0), abs=1e-9)
    # Uncertain images (uniform), or all certain of the same class: IS = 1, its minimum.
    assert fid_math.inception_score(np.full((1000, classes), 1 / classes)) == pytest.approx((1.0, 0.0))
    assert fid_math.inception_score(np.eye(classes)[np.zeros(1000, int)]) == pytest.approx((1.0, 0.0))
    # Splits that differ: split k holds classes 0..k equally often (2520 images each, a
    # multiple of 1..10), so IS_k = k + 1.
    per_split = [np.eye(10)[np.arange(2520) % (k + 1)] for k in range(10)]
    mean, std = fid_math.inception_score(np.concatenate(per_split))
    assert mean == pytest.approx(5.5) and std == pytest.approx(np.std(np.arange(1, 11)))


def test_streamed_inception_score_equals_the_original_code():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 4, size=(1003, 1008)) * rng.uniform(0, 1, size=(1003, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(fid_math.class_probabilities(logits + 3.0), probabilities, rtol=1e-9)
    sums = fid_math.InceptionScoreSums(1003)  # splits of 100 and 101 images
    for start, stop in ((0, 7), (7, 450), (450, 1003)):  # batches across split boundaries
        sums.update(probabilities[start:stop])
    mean, std = sums.score()
    np.testing.assert_allclose((mean, std), original_inception_score(probabilities), rtol=1e-9)
    assert 1.5 < mean and std > 0  # confident and diverse enough to test something


def test_kid_is_the_unbiased_polynomial_mmd_over_subsets():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(12, 6)), rng.normal(0.5, 1.0, size=(12, 6))

    def k(a, b):
        return (a @ b / 6 + 1) ** 3

    pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
    unbiased = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
                - 2 * np.mean([k(a, b) for a in x for b in y]))
    assert fid_math.polynomial_mmd_squared(x, y) == pytest.approx(unbiased, rel=1e-5)
    # Every feature of X equal to a and of Y to b: each subset's MMD is k(a,a)+k(b,b)-2k(a,b).
    a, b = rng.normal(size=2048), rng.normal(size=2048)
    mean, std, size = fid_math.kernel_inception_distance(np.tile(a, (50, 1)), np.tile(b, (60, 1)),
                                                    num_subsets=5, subset_size=40)
    closed = ((a @ a / 2048 + 1) ** 3 + (b @ b / 2048 + 1) ** 3 - 2 * (a @ b / 2048 + 1) ** 3)
    assert size == 40 and mean == pytest.approx(closed, rel=1e-4) and std < 1e-4 * abs(closed)
    # Two draws of one distribution score ~0, of two distributions clearly above.
    same = fid_math.kernel_inception_distance(rng.normal(size=(400, 64)), rng.normal(size=(400, 64)),
                                         num_subsets=20, subset_size=200)[0]
    apart = fid_math.kernel_inception_distance(rng.normal(size=(400, 64)),
                                          rng.normal(0.3, 1.0, size=(400, 64)),
                                          num_subsets=20, subset_size=200)[0]
    assert abs(same) < 0.1 * apart


def test_the_kid_subset_keeps_the_chosen_features_of_a_stream():
    features = np.random.default_rng(10).normal(size=(503, 4)).astype(np.float32)
    subset = fid_math.FeatureSubset(503, keep=50, seed=3)
    for start, stop in ((0, 100), (100, 101), (101, 503)):
        subset.update(features[start:stop])
    kept = subset.features()
    chosen = np.sort(np.random.default_rng(3).choice(503, 50, replace=False))
    np.testing.assert_array_equal(kept, features[chosen])
    everything = fid_math.FeatureSubset(20, keep=50)
    everything.update(features[:20])
    np.testing.assert_array_equal(everything.features(), features[:20])


# ---------------------------------------------------------- the network and its weight file


def standard_layout():
    """Keys and shapes of pt_inception-2015-12-05-6726825d.pth, written out from the
    Inception-v3 definition (torchvision module names, FID's 1008 classes, no aux head)."""
    layout = {}

    def conv(name, cin, cout, kh, kw=None):
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
        for key in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{key}"] = (cout,)

    for name, cin, cout, k in (("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3),
                               ("Conv2d_2b_3x3", 32, 64, 3), ("Conv2d_3b_1x1", 64, 80, 1),
                               ("Conv2d_4a_3x3", 80, 192, 3)):
        conv(name, cin, cout, k)
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        conv(f"{name}.branch1x1", cin, 64, 1)
        conv(f"{name}.branch5x5_1", cin, 48, 1)
        conv(f"{name}.branch5x5_2", 48, 64, 5)
        conv(f"{name}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{name}.branch3x3dbl_2", 64, 96, 3)
        conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
        conv(f"{name}.branch_pool", cin, pool, 1)
    conv("Mixed_6a.branch3x3", 288, 384, 3)
    conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        conv(f"{name}.branch1x1", 768, 192, 1)
        conv(f"{name}.branch7x7_1", 768, c7, 1)
        conv(f"{name}.branch7x7_2", c7, c7, 1, 7)
        conv(f"{name}.branch7x7_3", c7, 192, 7, 1)
        conv(f"{name}.branch7x7dbl_1", 768, c7, 1)
        conv(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_3", c7, c7, 1, 7)
        conv(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_5", c7, 192, 1, 7)
        conv(f"{name}.branch_pool", 768, 192, 1)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1)
    conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        conv(f"{name}.branch1x1", cin, 320, 1)
        conv(f"{name}.branch3x3_1", cin, 384, 1)
        conv(f"{name}.branch3x3_2a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{name}.branch3x3dbl_1", cin, 448, 1)
        conv(f"{name}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{name}.branch_pool", cin, 192, 1)
    layout["fc.weight"] = (1008, 2048)
    layout["fc.bias"] = (1008,)
    return layout


def synthetic_state_dict(seed=0):
    """Random weights in the standard file's layout: He-scaled convolutions, identity batch
    norm, so features stay O(1) through the 94 layers; plus the files' step counters."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in standard_layout().items():
        if key.endswith("conv.weight"):
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            value = np.ones(shape)
        elif key == "fc.weight":
            value = rng.normal(size=shape) / np.sqrt(shape[1])
        else:
            value = np.zeros(shape)
        state[key] = value.astype(np.float32)
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state


def test_parameters_have_the_standard_weight_files_layout():
    layout = inception.file_layout()
    assert layout == standard_layout()
    # Independently: torchvision's Inception-v3 has 27,161,264 trainable parameters; the FID
    # graph drops the auxiliary head (3,326,696) and has 8 more classes (8 x 2049).
    trainable = sum(int(np.prod(s)) for k, s in layout.items() if "running" not in k)
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2049


def test_weights_map_onto_the_network_and_bad_files_are_named(tmp_path):
    state_dict = synthetic_state_dict()
    params = inception.params_from_state_dict(state_dict)
    conv = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # [out, in, 1, 7]
    np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  state_dict["Mixed_7c.branch_pool.bn.running_var"])
    broken = dict(state_dict)
    del broken["Mixed_5b.branch1x1.bn.running_mean"]
    broken["Mixed_6a.branch3x3.conv.weight"] = np.zeros((384, 288, 5, 5), np.float32)
    broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    with pytest.raises(inception.InceptionWeightsError) as error:
        inception.params_from_state_dict(broken)
    for expected in ("missing Mixed_5b.branch1x1.bn.running_mean", "Mixed_6a.branch3x3.conv.weight",
                     "unexpected AuxLogits.fc.weight"):
        assert expected in str(error.value)
    with pytest.raises(inception.InceptionWeightsError, match="download"):
        inception.read_state_dict(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    truncated = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    truncated.write_bytes(b"not the weights")
    with pytest.raises(inception.InceptionWeightsError, match="incomplete or corrupt"):
        inception.read_state_dict(str(truncated))


def test_resize_is_half_pixel_bilinear_with_clamped_edges():
    """Against PyTorch's `interpolate(bilinear, align_corners=False)` rule, written in NumPy."""

    def reference(image, size):
        def weights(n_in):
            src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
            low = np.minimum(np.floor(src).astype(int), n_in - 1)
            high = np.minimum(low + 1, n_in - 1)
            matrix = np.zeros((size, n_in))
            matrix[np.arange(size), low] += 1 - (src - low)
            matrix[np.arange(size), high] += src - low
            return matrix

        rows, cols = weights(image.shape[0]), weights(image.shape[1])
        return np.einsum("ih,jw,hwc->ijc", rows, cols, image)

    rng = np.random.default_rng(4)
    for shape in ((7, 5, 3), (40, 33, 3)):  # up- and downsampling, non-square
        image = rng.uniform(size=shape).astype(np.float32)
        ours = inception.resize_bilinear(jnp.asarray(image)[None], 19)[0]
        np.testing.assert_allclose(ours, reference(image.astype(np.float64), 19), atol=1e-5)


def test_pools_follow_the_2015_graph_at_borders():
    ones = jnp.ones((1, 5, 5, 2))
    np.testing.assert_allclose(inception.avg_pool_3x3(ones), ones)  # padding not averaged in
    negative = -jnp.arange(1.0, 26.0).reshape(1, 5, 5, 1)
    pooled = inception.max_pool_3x3(negative, 1)
    assert pooled.shape == negative.shape and float(pooled.max()) < 0  # padding never wins
    assert float(pooled[0, 0, 0, 0]) == -1.0


def test_converted_weights_carry_their_provenance_and_others_are_flagged(tmp_path):
    """Only weights provably from the standard file (its sha256 prefix, arrays unchanged since
    conversion) count as standard; non-finite weights are refused."""
    weights = synthetic_state_dict()
    standard_digest = "6726825d" + "0" * 56  # what the standard file's sha256 starts with
    path = str(tmp_path / "converted.npz")
    inception.save_npz(weights, path, source=inception.STANDARD_FILE,
                       source_sha256=standard_digest)
    assert inception.not_standard_reason(path, inception.read_state_dict(path)) == ""
    # same layout, other values: the arrays no longer match the digest taken at conversion
    tampered = dict(inception.read_state_dict(path))
    tampered["fc.weight"] = tampered["fc.weight"] * 2
    assert "changed after conversion" in inception.not_standard_reason(path, tampered)
    other = str(tmp_path / "other.npz")
    inception.save_npz(weights, other, source="mine.pth", source_sha256="ab" * 32)
    assert "not 6726825d" in inception.not_standard_reason(other, inception.read_state_dict(other))
    legacy = str(tmp_path / "legacy.npz")  # written before digests were kept
    np.savez(legacy, **{k: v for k, v in weights.items() if "num_batches" not in k})
    assert "does not record" in inception.not_standard_reason(legacy,
                                                              inception.read_state_dict(legacy))
    warnings = []
    from absl import logging

    original, logging.warning = logging.warning, lambda msg, *a: warnings.append(msg % a)
    try:
        inception.load(other)
    finally:
        logging.warning = original
    assert len(warnings) == 1 and "not comparable with published numbers" in warnings[0]
    broken = dict(weights)
    broken["Conv2d_1a_3x3.conv.weight"] = broken["Conv2d_1a_3x3.conv.weight"] * np.nan
    nan_path = str(tmp_path / "nan.npz")
    inception.save_npz(broken, nan_path)
    with pytest.raises(inception.InceptionWeightsError, match="non-finite values in Conv2d_1a"):
        inception.load(nan_path)


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.npz"
    inception.save_npz(synthetic_state_dict(), str(path), source="synthetic")
    return str(path)


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two sets of 16x16 pictures: smooth gradients, and the same with strong noise."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 255, 16)
    smooth = np.stack([np.stack(np.broadcast_arrays(ramp[:, None] * f, ramp[None, :] * (1 - f),
                                                    np.full((16, 16), 128.0)), -1)
                       for f in np.linspace(0, 1, 10)]).astype(np.uint8)
    noisy = np.clip(smooth + rng.normal(0, 80, smooth.shape), 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("images")
    write_images(root / "smooth", smooth)
    return root, smooth, noisy


@pytest.mark.slow
def test_fid_stats_and_fid_commands_end_to_end(weights_file, image_sets, tmp_path):
    root, smooth, noisy = image_sets
    stats_path = tmp_path / "stats.npz"
    command = [sys.executable, "-m", "ddpm_jax.evaluate", "fid-stats",
               f"--config={ROOT}/configs/quickstart.py", "--config.data.source=folder",
               f"--config.data.path={root / 'smooth'}", "--config.data.image_size=16",
               f"--weights={weights_file}", f"--output={stats_path}", "--batch_size=4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=command_env())
    assert result.returncode == 0, result.stderr[-3000:]
    mu, sigma, metadata = fid.load_statistics(str(stats_path))
    assert metadata["num_images"] == "10" and metadata["image_size"] == "16"
    assert np.all(np.isfinite(sigma)) and np.abs(mu).max() > 0

    # The same pictures from a folder score ~0; the noisy ones from an .npz score far above.
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.evaluate", "fid", f"--samples={root / 'smooth'}",
         f"--reference={stats_path}", f"--weights={weights_file}", "--batch_size=4",
         f"--json={tmp_path / 'fid.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=command_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FID" in result.stdout and "IS" in result.stdout and "KID" in result.stdout
    scores = evaluate.json.loads((tmp_path / "fid.json").read_text())
    same = scores["fid"]
    np.savez(tmp_path / "noisy.npz", images=noisy)
    different = evaluate.sample_fid(str(tmp_path / "noisy.npz"), str(stats_path), weights_file,
                                    batch_size=3)  # 4 batches over 4 devices, the last padded
    scale = np.trace(sigma)
    assert abs(same) < 1e-3 * scale
    assert different["fid"] > 0.5 * scale and different["num_images"] == 10
    # IS and KID beside FID: fid-stats kept all 10 features; the same pictures score as the
    # reference's own IS, and their KID is far below the noisy ones'.
    reference = fid.load_reference(str(stats_path))
    assert reference.kid_features.shape == (10, inception.FEATURE_DIM)
    assert scores["inception_score"] == pytest.approx(float(metadata["inception_score"]), rel=1e-6)
    assert 1.0 <= scores["inception_score"] and scores["kid_subset_size"] == 10
    assert different["kid"] > 10 * abs(scores["kid"])
    # the sample command's key, arr_0 (the ADM evaluator's), wins over a legacy `images`
    np.savez(tmp_path / "both.npz", images=noisy[:4], arr_0=noisy)
    both = evaluate.sample_fid(str(tmp_path / "both.npz"), str(stats_path), weights_file,
                               batch_size=3)
    assert both["num_images"] == 10 and both["fid"] == pytest.approx(different["fid"], rel=1e-6)


def test_a_stop_during_a_batch_of_samples_skips_its_inception_pass():
    # The stop latency during in-loop FID: a stop request that came while a batch was being
    # sampled is answered before that batch's Inception pass (seconds on a CPU), not after.
    class Sampler:
        num_images = 4
        calls = 0

        def __call__(self, params, rng, should_stop):
            self.calls += 1
            return np.zeros((4, 8, 8, 3), np.float32)  # finished its chunks, then the stop came

    class NoInception:
        def outputs_of_global(self, images):
            raise AssertionError("the Inception pass ran after the stop request")

    sampler = Sampler()
    scores = fid.InceptionFeatures.sample_statistics(
        NoInception(), sampler, None, jax.random.PRNGKey(0), 8, should_stop=lambda: True)
    assert scores is None and sampler.calls == 1


def test_fid_under_50000_samples_warns_that_it_is_not_comparable(monkeypatch):
    from absl import logging

    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    rng = np.random.default_rng(0)
    mu, sigma = np.zeros(16), np.eye(16)  # the warning depends on the count alone
    stats = fid_math.FeatureStatistics(16)
    stats.update(rng.normal(size=(3000, 16)))
    fid.distance_to(stats, mu, sigma)
    assert len(warnings) == 1 and "FID over 3000 samples" in warnings[0]
    assert "not comparable with published numbers" in warnings[0]
    monkeypatch.setattr(fid, "PUBLISHED_SAMPLE_COUNT", 3000)  # as many as published
    warnings.clear()
    fid.distance_to(stats, mu, sigma)
    assert warnings == []


def test_evaluate_rejects_bad_sample_files(weights_file, tmp_path):
    np.savez(tmp_path / "floats.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    stats = fid_math.FeatureStatistics()
    stats.update(np.random.default_rng(0).normal(size=(3, inception.FEATURE_DIM)))
    fid.save_statistics(str(tmp_path / "stats.npz"), stats)
    with pytest.raises(ValueError, match="uint8 images"):
        evaluate.sample_fid(str(tmp_path / "floats.npz"), str(tmp_path / "stats.npz"), weights_file)


@pytest.mark.slow
def test_fid_during_training_is_logged_and_checked_up_front(weights_file, tmp_path):
    stats = fid_math.FeatureStatistics()
    stats.update(np.random.default_rng(6).uniform(size=(8, inception.FEATURE_DIM)))
    fid.save_statistics(str(tmp_path / "stats.npz"), stats)
    config = micro_config()
    config.num_train_steps = 2
    config.sample_every_steps = 0  # FID alone: no sample grid
    config.eval_every_steps = 2
    config.eval.inception_weights = weights_file
    config.eval.reference_stats = str(tmp_path / "stats.npz")
    config.eval.num_samples = 6
    config.eval.batch_size = 4  # two sampling batches, the second cut to 2
    config.eval.num_steps = 2
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    fid_events = read_scalars(str(workdir), "fid")
    assert [step for step, _ in fid_events] == [2]
    assert np.isfinite(fid_events[0][1]) and fid_events[0][1] > 0
    # the reference has no kid_features (written without them): IS, but no KID
    assert [step for step, _ in read_scalars(str(workdir), "inception_score")] == [2]
    assert read_scalars(str(workdir), "kid") == []
    # `evaluate fid` on the workdir: the run's own eval settings, weights and reference.
    result = evaluate.sample_fid(str(workdir), None, None, num_images=5, batch_size=4)
    assert result["step"] == 2 and result["num_images"] == 5 and result["sampler"] == "ddim"
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["kid"] is None and "fid-stats" in result["kid_note"]

    config.eval.reference_stats = str(tmp_path / "missing.npz")
    with pytest.raises(config_checks.ConfigError, match="eval.reference_stats"):
        train.train_and_evaluate(config, str(tmp_path / "other"))
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_features_of_model_space_samples_equal_those_of_their_pngs(weights_file):
    """On-device quantisation of [-1, 1] samples matches the uint8 the sample command writes."""
    from ddpm_jax import image_utils
    from ddpm_jax.runtime import sharding

    features = fid.InceptionFeatures(weights_file, sharding.create_mesh())
    samples = np.random.default_rng(7).uniform(-1.3, 1.3, (4, 16, 16, 3)).astype(np.float32)
    from_floats = features.of_global(jax.device_put(samples))
    from_pngs = features.of_global(jax.device_put(image_utils.to_uint8(samples)))
    np.testing.assert_array_equal(from_floats, from_pngs)


def test_fid_class_labels_are_balanced_or_follow_the_data():
    uniform = compiled_sampler.class_labels(3, 10, "uniform", seed=1)
    assert sorted(np.bincount(uniform, minlength=3).tolist()) == [3, 3, 4]
    assert not np.array_equal(uniform, np.sort(uniform))  # shuffled: batches mix classes
    data = compiled_sampler.class_labels(2, 20_000, "data", counts=[300, 100])
    assert abs((data == 0).mean() - 0.75) < 0.02
    with pytest.raises(ValueError, match="uniform"):
        compiled_sampler.class_labels(2, 10, "data", counts=None)
