"""ddpm-jax: Denoising Diffusion Probabilistic Models in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path: str, step: int | None = None, weights: str = "ema"):
    """(model, config) of a ddpm-jax workdir or a diffusers folder; `model(x, t)` runs the
    network (see `ddpm_jax.loading`). Imported on first use, so `import ddpm_jax` stays light."""
    from ddpm_jax import loading  # heavy (JAX, Flax, Orbax): only when a model is loaded

    return loading.load_model(path, step, weights)


def load_pipeline(path: str, step: int | None = None, weights: str = "ema"):
    """A ddpm-jax workdir or a diffusers folder, loaded to make images:
    `load_pipeline(PATH).sample(16, seed=0)` gives uint8 [16, H, W, 3] (see
    `ddpm_jax.loading`); `.model` is the network."""
    from ddpm_jax import loading

    return loading.load_pipeline(path, step, weights)
