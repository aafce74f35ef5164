"""ddpm-jax: Denoising Diffusion Probabilistic Models in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path: str, step: int | None = None, weights: str = "ema"):
    """(model, config) of a ddpm-jax workdir or a diffusers folder; `model(x, t)` runs the
    network (see `ddpm_jax.loading`). Imported on first use, so `import ddpm_jax` stays light."""
    from ddpm_jax import loading  # heavy (JAX, Flax, Orbax): only when a model is loaded

    return loading.load_model(path, step, weights)
