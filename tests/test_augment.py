"""Non-leaky augmentation (`core/augment.py`, the train step, the net's augmentation input)
against EDM's `AugmentPipe` transcribed in NumPy: the parameters' distributions, the pixel
transforms, the geometric warp and the colour matrix; and the train step with it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import checkpointing, diffusers_weights, train
from ddpm_jax.core import augment
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import network
from ddpm_jax.train import config_checks
from ddpm_jax.train.step import augmented
from tests.helpers import check_resume_is_exact, micro_config

EVERY = {name: 1.0 for name in augment.TRANSFORMS}


def edm_labels(rng, n, p, multipliers, height, width):
    """EDM's AugmentPipe.__call__ (training/augment.py), its parameter draws and `labels`
    only, transcribed with NumPy's generator: [n, label_dim]."""
    columns = []

    def gated(w, name, shape=None):
        applied = rng.uniform(size=shape or (n,)) < multipliers[name] * p
        return np.where(applied, w, np.zeros_like(w))

    for name in augment.TRANSFORMS:
        if multipliers.get(name, 0) <= 0:
            continue
        if name in ("xflip", "yflip", "lumaflip"):
            columns.append(gated(rng.integers(0, 2, n), name))
        elif name == "rotate_int":
            w = gated(rng.integers(0, 4, n), name)
            columns += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        elif name == "translate_int":
            w = gated(rng.uniform(size=(2, n)) * 2 - 1, name, (1, n))
            tx, ty = np.round(w[0] * width * 0.125), np.round(w[1] * height * 0.125)
            columns += [tx / (width * 0.125), ty / (height * 0.125)]
        elif name in ("scale", "brightness", "contrast", "saturation"):
            columns.append(gated(rng.normal(size=n), name))
        elif name in ("rotate_frac", "hue"):
            w = gated((rng.uniform(size=n) * 2 - 1) * np.pi, name)
            columns += [np.cos(w) - 1, np.sin(w)]
        elif name == "aniso":
            w, r = rng.normal(size=n), (rng.uniform(size=n) * 2 - 1) * np.pi
            w = gated(w, name)
            r = np.where(rng.uniform(size=n) < 0.5, r, np.zeros_like(r))
            columns += [w * np.cos(r), w * np.sin(r)]
        elif name == "translate_frac":
            w = gated(rng.normal(size=(2, n)), name, (1, n))
            columns += [w[0], w[1]]
    return np.stack([np.asarray(c, np.float64) for c in columns], axis=1)


def our_labels(n, p, multipliers, height, width, seed=0):
    settings = augment.AugmentSettings.of(p, multipliers)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    draw = lambda key: augment.labels(augment.draw(key, settings, height, width),  # noqa: E731
                                      settings, height, width)
    return np.asarray(jax.vmap(draw)(keys), np.float64)


def ks_distance(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the ECDFs."""
    values = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), values, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("p, multipliers", [
    (0.5, EVERY),
    (0.12, {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1,
            "translate_frac": 1}),  # EDM's CIFAR-10 set
])
def test_each_parameter_has_the_distribution_edm_draws_it_from(p, multipliers):
    n, height, width = 40_000, 32, 24
    ours = our_labels(n, p, multipliers, height, width)
    # in float32, as ours are (so that equal discrete values compare equal)
    theirs = edm_labels(np.random.default_rng(0), n, p, multipliers, height, width
                        ).astype(np.float32).astype(np.float64)
    assert ours.shape == theirs.shape == (n, augment.AugmentSettings.of(p, multipliers).label_dim)
    # 40,000 draws a side: the 0.1% critical KS distance is 1.95 sqrt(2 / n) = 0.0138
    distances = [ks_distance(ours[:, j], theirs[:, j]) for j in range(ours.shape[1])]
    assert max(distances) < 0.0138, distances
    # the share of images each transform leaves alone (its first entry exactly 0)
    np.testing.assert_allclose((ours == 0).mean(0), (theirs == 0).mean(0), atol=0.012)


def test_pixel_transforms_move_pixels_as_edm_does():
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (6, 6, 3)).astype(np.float32)
    one = lambda name, value: np.asarray(augment.blit(  # noqa: E731
        jnp.asarray(image), {name: jnp.asarray(value)}))
    np.testing.assert_array_equal(one("xflip", 1), image[:, ::-1])
    np.testing.assert_array_equal(one("yflip", 1), image[::-1])
    np.testing.assert_array_equal(one("xflip", 0), image)
    # rotate_int w: flip x for 1, 2; flip y for 2, 3; transpose for 1, 3 (EDM's order)
    chw = image.transpose(2, 0, 1)
    for turn in range(4):
        want = chw
        if turn in (1, 2):
            want = want[:, :, ::-1]
        if turn in (2, 3):
            want = want[:, ::-1]
        if turn in (1, 3):
            want = want.transpose(0, 2, 1)
        np.testing.assert_array_equal(one("rotate_int", turn), want.transpose(1, 2, 0))
    # translate_int: EDM's reflected index arithmetic, x - tx and y + ty
    for tx, ty in [(2, -1), (-3, 3), (0, 0)]:
        h, w = 6, 6
        y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xs = w - 1 - np.abs(w - 1 - np.mod(x - tx, 2 * w - 2))
        ys = h - 1 - np.abs(h - 1 - np.mod(y + ty, 2 * h - 2))
        np.testing.assert_array_equal(one("translate_int", [tx, ty]), image[ys, xs])


def edm_warp(image, g_inv):
    """EDM's geometric execution (pad, 2x upsampling with the wavelet, affine_grid and
    bilinear grid_sample with zero padding, align_corners=False, filtering and decimation)
    transcribed in NumPy for one image [C, H, W], with its margins at their clamp (the side
    minus one), which they are whenever the warp reaches that far."""
    channels, height, width = image.shape
    hz = augment.SYM6
    hz_pad = len(hz) // 4
    images = np.pad(image, ((0, 0), (height - 1,) * 2, (width - 1,) * 2), mode="reflect")

    def conv(x, weights, pad, axis, stride=1):  # torch conv2d (cross-correlation) on one axis
        x = np.moveaxis(x, axis, -1)
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
        length = x.shape[-1] - len(weights) + 1
        out = sum(weights[m] * x[..., m:m + length] for m in range(len(weights)))
        return np.moveaxis(out[..., ::stride], -1, axis)

    for axis in (2, 1):  # width, then height, as EDM
        stacked = np.stack([images, np.zeros_like(images)], axis=axis + 1)
        shape = list(images.shape)
        shape[axis] *= 2
        images = np.take(stacked.reshape(shape), np.arange(shape[axis] - 1), axis=axis)
        images = conv(images, hz[::-1], (len(hz) + 1) // 2, axis)

    def scale(sx, sy):
        return np.diag([sx, sy, 1.0])

    def translate(tx, ty):
        return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])

    g = scale(2, 2) @ g_inv @ np.linalg.inv(scale(2, 2))
    g = translate(-0.5, -0.5) @ g @ np.linalg.inv(translate(-0.5, -0.5))
    out_h, out_w = (height + 2 * hz_pad) * 2, (width + 2 * hz_pad) * 2
    in_h, in_w = images.shape[1:]
    g = scale(2 / in_w, 2 / in_h) @ g @ np.linalg.inv(scale(2 / out_w, 2 / out_h))
    ys, xs = np.meshgrid((2 * np.arange(out_h) + 1) / out_h - 1,
                         (2 * np.arange(out_w) + 1) / out_w - 1, indexing="ij")
    gx = g[0, 0] * xs + g[0, 1] * ys + g[0, 2]
    gy = g[1, 0] * xs + g[1, 1] * ys + g[1, 2]
    ix, iy = ((gx + 1) * in_w - 1) / 2, ((gy + 1) * in_h - 1) / 2
    x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
    sampled = np.zeros((channels, out_h, out_w))
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(ix - xi)) * (1 - np.abs(iy - yi))
            inside = (xi >= 0) & (xi < in_w) & (yi >= 0) & (yi < in_h)
            values = images[:, np.clip(yi, 0, in_h - 1), np.clip(xi, 0, in_w - 1)]
            sampled += np.where(inside, weight, 0.0) * values
    sampled = conv(sampled, hz, (len(hz) - 1) // 2, 2, stride=2)[:, :, hz_pad:-hz_pad]
    return conv(sampled, hz, (len(hz) - 1) // 2, 1, stride=2)[:, hz_pad:-hz_pad]


def test_the_warp_is_edms_and_exact_where_pixels_land_on_pixels():
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (10, 12, 3)).astype(np.float32)
    params = {"scale": jnp.asarray(0.7), "rotate_frac": jnp.asarray(0.4),
              "aniso": jnp.asarray(-1.1), "aniso_angle": jnp.asarray(0.9),
              "translate_frac": jnp.asarray([0.3, -0.2])}
    g_inv = augment.warp_matrix(params, 10, 12)
    ours = np.asarray(augment.warp(jnp.asarray(image), g_inv))
    theirs = edm_warp(image.transpose(2, 0, 1).astype(np.float64), np.asarray(g_inv, np.float64))
    np.testing.assert_allclose(ours, theirs.transpose(1, 2, 0), atol=2e-5)
    # no warp, and whole-pixel shifts: the pixels themselves (the filter is orthogonal)
    np.testing.assert_allclose(augment.warp(jnp.asarray(image), jnp.eye(3)), image, atol=1e-5)
    shift = jnp.array([[1.0, 0.0, -2.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # right 2, up 1
    np.testing.assert_allclose(augment.warp(jnp.asarray(image), shift)[:-1, 2:],
                               image[1:, :-2], atol=1e-5)


def edm_colour_matrix(b, c, flip, hue, saturation):
    """EDM's colour matrix M for one image (brightness, contrast, luma flip, hue, saturation
    draws), transcribed in NumPy."""
    v = np.array([1, 1, 1, 0]) / np.sqrt(3)
    m = np.eye(4)
    t = np.eye(4)
    t[:3, 3] = b * 0.2
    m = t @ m
    m = np.diag([2 ** (c * 0.5)] * 3 + [1]) @ m
    m = (np.eye(4) - 2 * np.outer(v, v) * flip) @ m
    s, co = np.sin(hue), np.cos(hue)
    x = y = z = 1 / np.sqrt(3)
    rotate = np.array([[x * x * (1 - co) + co, x * y * (1 - co) - z * s, x * z * (1 - co) + y * s, 0],
                       [y * x * (1 - co) + z * s, y * y * (1 - co) + co, y * z * (1 - co) - x * s, 0],
                       [z * x * (1 - co) - y * s, z * y * (1 - co) + x * s, z * z * (1 - co) + co, 0],
                       [0, 0, 0, 1]])
    m = rotate @ m
    return (np.outer(v, v) + (np.eye(4) - np.outer(v, v)) * 2 ** saturation) @ m


def test_the_colour_matrix_is_edms_and_is_applied_to_rgb():
    draws = dict(brightness=0.8, contrast=-0.6, lumaflip=1, hue=2.1, saturation=-0.4)
    ours = augment.colour_matrix({k: jnp.asarray(v) for k, v in draws.items()})
    want = edm_colour_matrix(*draws.values())
    np.testing.assert_allclose(ours, want, atol=1e-6)
    settings = augment.AugmentSettings.of(1.0, {name: 1e8 for name in augment.COLOUR})
    image = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 4, 3)), jnp.float32)
    key = jax.random.PRNGKey(7)
    out, _ = augment.augment(key, image, settings)
    matrix = np.asarray(augment.colour_matrix(augment.draw(key, settings, 4, 4)))
    np.testing.assert_allclose(out, np.asarray(image) @ matrix[:3, :3].T + matrix[:3, 3],
                               atol=1e-6)


def augment_config(p=0.5, **multipliers):
    config = micro_config()
    config.data.augment.probability = p
    for name, value in multipliers.items():
        config.data.augment[name] = value
    return config


def test_each_image_gets_its_own_draws_and_keeps_its_place():
    """The batch function gives image i what augmenting image i alone with its own key
    gives: images and their vectors stay aligned, however the batch is split."""
    settings = augment.AugmentSettings.of(0.05, EVERY)  # each image untouched with chance 0.51
    x0 = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (10, 8, 8, 3)), jnp.float32)
    rng = jax.random.PRNGKey(3)
    images, vectors = augmented(rng, x0, settings)
    for i in range(10):
        key = jax.random.fold_in(jax.random.fold_in(rng, i), 4)
        image, vector = augment.augment(key, x0[i], settings)
        np.testing.assert_allclose(images[i], image, atol=1e-6)
        np.testing.assert_array_equal(vectors[i], vector)
    untouched = np.all(np.asarray(vectors) == 0, axis=1)
    assert untouched.any() and not untouched.all()
    for i in np.flatnonzero(untouched):  # no transform drawn: the image as it was
        np.testing.assert_allclose(images[i], x0[i], atol=1e-5)


def test_the_net_is_told_the_vector_and_sampling_feeds_zeros():
    config = augment_config(xflip=1e8)
    assert network.abstract_params(config)["augment_map"]["kernel"].shape == (
        augment.settings_of(config.data.augment).label_dim, config.model.base_channels)
    assert "augment_map" not in network.abstract_params(micro_config())  # unchanged trees
    params, definition = network.random_params(config), network.graphdef(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    t = jnp.array([10, 500])
    dim = network.abstract_params(config)["augment_map"]["kernel"].shape[0]
    plain = network.apply(definition, params, x, t)
    np.testing.assert_array_equal(
        plain, network.apply(definition, params, x, t, augment_labels=jnp.zeros((2, dim))))
    told = network.apply(definition, params, x, t, augment_labels=jnp.full((2, dim), 10.0))
    # far beyond float rounding: the map reaches the output
    assert np.abs(np.asarray(told) - np.asarray(plain)).max() > 1e-4
    # the diffusers export leaves the map out: at sampling its input is zero
    names = diffusers_weights.weight_names(config)
    assert all(path[0] != "augment_map" for path in names)
    assert len(diffusers_weights.to_state_dict(params, config)) == len(names)


def test_probability_zero_leaves_the_step_as_it_was():
    """At probability 0 nothing of the augmentation is built: the net has no map and the
    step equals the step of a config saved before `data.augment` existed."""
    config = micro_config()
    config.data.augment.rotate_int = 1.0  # a multiplier alone turns nothing on
    old = micro_config()
    del old.data["augment"]
    old = ml_collections.ConfigDict(checkpointing.with_defaults(old.to_dict()))
    batch = np.random.default_rng(5).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    states = []
    for c in (config, old):
        mesh = train.create_mesh(c, jax.devices()[:1])
        state, _ = train.make_train_step(c, mesh)(train.create_train_state(c, mesh),
                                                    train.global_batch(batch, mesh))
        states.append(state)
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    (dict(probability=1.5), "data.augment.probability must be in"),
    (dict(probability=0.2, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0),
     "turn one on"),
    (dict(probability=0.2, hue=-1.0), "data.augment.hue=-1.0"),
])
def test_bad_augmentation_settings_are_refused_before_any_work(change, message):
    config = augment_config(**change)
    with pytest.raises(UserError, match=message):
        config_checks.validate(config)


@pytest.mark.slow
def test_an_augmented_run_resumes_bitwise_and_its_vector_width_is_kept(tmp_path):
    config = augment_config(0.5, rotate_int=1.0, brightness=1.0, hue=1.0)
    config.sample_every_steps = 0
    check_resume_is_exact(config, tmp_path)
    config.data.augment.hue = 0.0  # two entries fewer: another net
    config.num_train_steps = 6
    with pytest.raises(config_checks.ConfigError, match="augmentation vector of 14 entries, the config's 12"):
        train.train_and_evaluate(config, str(tmp_path / "split"))


def test_the_small_data_config_is_edms_64x64_ddpmpp_with_its_augmentation_input(tmp_path):
    from configs import small_data
    from tests.test_later_nets import config_param_count, edm_unet_count

    config = small_data.get_config()
    assert augment.settings_of(config.data.augment).label_dim == 9  # EDM's augment_dim
    want = edm_unet_count(64, 128, (1, 2, 2, 2), 4, (16,), adaptive_scale=False,
                          resample_proj=True, decoder_attention_last=True, augment_dim=9)
    assert config_param_count(config) == want
    with pytest.raises(UserError, match="needs data.path"):
        config_checks.validate(config)
    config.data.path = str(tmp_path)
    config_checks.validate(config)
