"""A trained network for use from Python: `model, config = ddpm_jax.load_model(PATH)`.

PATH is a ddpm-jax workdir (its newest checkpoint, or `step`) or a diffusers folder
(`DDPMPipeline` or `UNet2DModel`). The model is the network alone, jitted:
`model(x, t)` maps noisy images x (float32 [B, H, W, 3], NHWC) and integer timesteps t [B]
to the network output (the noise, x0 or v, as `config.diffusion.prediction` says; with
learned variances 6 channels, the prediction then the variance values). A class-
conditional model also takes `class_labels` [B] (ints below `config.model.num_classes`;
`model.null_label`, or None, for the unconditional model).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from ddpm_jax import convert, runs
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import network


class Model:
    """The network of `config` with fixed weights: `model(x, t, class_labels=None) -> output`
    (jitted).

    `params` are the weights (a pure dict), `module()` the Flax NNX module built from them.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        self.config = config
        self.params = params
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


def load_model(path: str, step: int | None = None,
               weights: str = "ema") -> tuple[Model, ml_collections.ConfigDict]:
    """(model, config) of a ddpm-jax workdir or a diffusers folder.

    `step` picks a workdir's checkpoint (default the newest); `weights` is "ema" (the EMA
    when the run keeps one, else the raw weights) or "params".
    """
    root = epath.Path(path)
    if (root / "model_index.json").exists() or (root / "config.json").exists():
        if step is not None:
            raise UserError(f"{path} is a diffusers folder, which has no steps; drop step")
        config, params = convert.read_diffusers(path)
    else:
        config, params, _, _ = runs.load_run(path, step, weights)
    return Model(config, params), config
