"""A trained model for use from Python.

`pipeline = ddpm_jax.load_pipeline(PATH)` makes images: `pipeline.sample(16)` returns uint8
[16, H, W, 3] (NHWC), drawn as the sample command draws them (the same seed, the same images),
with the run's sampler unless `sampler=`, `num_steps=` and the rest name another.

`model, config = ddpm_jax.load_model(PATH)` (also `pipeline.model`) is the network alone,
jitted: `model(x, t)` maps noisy images x (float32 [B, H, W, 3], NHWC) and integer
timesteps t [B] to the network output, which is what `model.prediction` names ("eps" the
noise, "x0" the clean image, "v" the velocity; with learned variances 6 channels, the
prediction then the variance values). A class-conditional model also takes `class_labels`
[B] (ints below `config.model.num_classes`; `model.null_label`, or None, for the
unconditional model).

PATH is a ddpm-jax workdir (its newest checkpoint, or `step`) or a diffusers folder
(`DDPMPipeline` or `UNet2DModel`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from ddpm_jax import checkpointing, convert, runs, sample
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import network, sharding


class Model:
    """The network of `config` with fixed weights: `model(x, t, class_labels=None) -> output`
    (jitted), the output being what `prediction` names ("eps", "x0" or "v").

    `params` are the weights (a pure dict), `module()` the Flax NNX module built from them.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        self.config = config
        self.params = params
        self.prediction = config.diffusion.prediction
        self.graphdef = network.graphdef(config)
        self.num_classes = config.model.get("num_classes", 0)
        self.null_label = self.num_classes  # the class embedding's last row
        self._apply = jax.jit(lambda p, x, t, labels: network.apply(
            self.graphdef, p, x, t, class_labels=labels))

    def __call__(self, x: jax.Array, t: jax.Array,
                 class_labels: jax.Array | None = None) -> jax.Array:
        size = self.config.data.image_size
        x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t)
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise UserError(f"x must be [B, {size}, {size}, 3] (NHWC images in [-1, 1]), "
                             f"got shape {x.shape}")
        if t.ndim == 0:
            t = jnp.full((x.shape[0],), t)
        if t.shape != (x.shape[0],) or not jnp.issubdtype(t.dtype, jnp.integer):
            raise UserError(f"t must be integer timesteps [B] = [{x.shape[0]}], got "
                             f"{t.dtype} {t.shape}")
        if class_labels is not None:
            if not self.num_classes:
                raise UserError("class_labels given, but this model is unconditional "
                                "(model.num_classes=0)")
            class_labels = jnp.asarray(class_labels)
            if class_labels.ndim == 0:
                class_labels = jnp.full((x.shape[0],), class_labels)
            if class_labels.shape != (x.shape[0],) or not jnp.issubdtype(class_labels.dtype,
                                                                         jnp.integer):
                raise UserError(f"class_labels must be integers [B] = [{x.shape[0]}], got "
                                f"{class_labels.dtype} {class_labels.shape}")
            class_labels = class_labels.astype(jnp.int32)
        return self._apply(self.params, x, t.astype(jnp.int32), class_labels)

    def module(self) -> nnx.Module:
        """The network as a Flax NNX module holding these weights."""
        return nnx.merge(self.graphdef, self.params)


class Pipeline:
    """A loaded model that makes images: `sample(num_images, ...)`; `model` is its network
    (`Model`), `config` its config, `step` the checkpoint (None for a diffusers folder)."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, mesh: jax.sharding.Mesh,
                 step: int | None = None, class_names: list[str] | None = None):
        self.config, self.step, self.class_names = config, step, class_names
        self._params, self._mesh = params, mesh
        self.model = Model(config, params)

    def sample(self, num_images: int, *, sampler: str | None = None,
               num_steps: int | None = None, seed: int = 0, spacing: str | None = None,
               eta: float | None = None, variance: str | None = None,
               guidance_scale: float | None = None, class_labels: list | None = None,
               batch_size: int = 64, progress: bool = False,
               **options: float) -> np.ndarray:
        """uint8 images [num_images, H, W, 3], as `python -m ddpm_jax.sample` draws them with
        the same flags (`sampler`, `num_steps`, `spacing`, `eta`, `variance`,
        `guidance_scale`, `class_labels` as numbers or class names, the sampler's other
        knobs as keywords, e.g. `s_churn=40`; None: the run's `config.sample`)."""
        images, _ = sample.generate_from(
            self.config, self._params, self._mesh, num_images, step=self.step,
            sampler=sampler, num_steps=num_steps, eta=eta, spacing=spacing, seed=seed,
            batch_size=batch_size, progress=progress, variance=variance,
            class_labels=class_labels, class_names=self.class_names,
            guidance_scale=guidance_scale, options=options or None)
        return images


def _is_diffusers_folder(path: str) -> bool:
    root = epath.Path(path)
    return (root / "model_index.json").exists() or (root / "config.json").exists()


def load_pipeline(path: str, step: int | None = None, weights: str = "ema") -> Pipeline:
    """The `Pipeline` of a ddpm-jax workdir (checkpoint `step`, default the newest; `weights`
    "ema" or "params") or a diffusers folder."""
    if _is_diffusers_folder(path):
        if step is not None:
            raise UserError(f"{path} is a diffusers folder, which has no steps; drop step")
        config, params = convert.read_diffusers(path)
        return Pipeline(config, params, sharding.create_mesh(config))
    config, params, step, mesh = runs.load_run(path, step, weights)
    return Pipeline(config, params, mesh, step, checkpointing.saved_classes(path))


def load_model(path: str, step: int | None = None,
               weights: str = "ema") -> tuple[Model, ml_collections.ConfigDict]:
    """(model, config) of a ddpm-jax workdir or a diffusers folder: `load_pipeline`'s.

    `step` picks a workdir's checkpoint (default the newest); `weights` is "ema" (the EMA
    when the run keeps one, else the raw weights) or "params".
    """
    pipeline = load_pipeline(path, step, weights)
    return pipeline.model, pipeline.config
