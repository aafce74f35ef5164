"""docs/extending.md: a sampler, a beta schedule, a data source and an evaluator registered
from outside the package run through `samplers.sample`, the config checks, a train step and
the loop, selected by name like the built-in ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers, train
from ddpm_jax.core import diffusion
from ddpm_jax.core.schedules import BETA_SCHEDULES
from ddpm_jax.data_sources import DATA_SOURCES, ArraySource, DataSource
from ddpm_jax.runtime import compiled_sampler
from ddpm_jax.samplers import SAMPLERS, Sampler, SamplerSettings
from ddpm_jax.train import config_checks
from tests.helpers import micro_config, read_events


def constant_betas(num_timesteps, beta_start, beta_end):
    """A toy schedule: every beta is beta_end."""
    del beta_start
    return np.full(num_timesteps, beta_end)


def counting_step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance,
                  clip_x0, scale):
    """DDIM with eta = 0, its last image times `scale * steps taken / steps visited`: correct
    only if the scan threads the sampler's own carry (`state`: steps taken so far)."""
    del noise, variance
    x = diffusion.ddim_step(schedule, model_output, x_t, t, t_prev, jnp.zeros_like(x_t), 0.0,
                            prediction=prediction, clip_x0=clip_x0)
    taken, visited = state
    final = scale * (taken + 1).astype(x.dtype) / visited
    return jnp.where(t_prev[0] < 0, x * final, x), (taken + 1, visited)


def counting_sampler(num_steps: int) -> Sampler:
    """The toy sampler, visiting `num_steps` timesteps by default; it has one knob, `scale`."""
    return Sampler(step=counting_step, default_steps=num_steps,
                   init_state=lambda x: (jnp.zeros((), jnp.int32), jnp.asarray(num_steps)),
                   options={"scale": 1.0})


@pytest.fixture
def toys():
    BETA_SCHEDULES.register("toy_constant", constant_betas)
    DATA_SOURCES.register("toy_gray", DataSource(
        open=lambda data: ArraySource(np.full((16, 8, 8, 3), 128, np.uint8))))
    yield
    for registry, name in ((BETA_SCHEDULES, "toy_constant"), (SAMPLERS, "toy_counting"),
                           (DATA_SOURCES, "toy_gray")):
        registry.unregister(name)


def test_a_registered_schedule_and_sampler_run_through_sample(toys):
    schedule = diffusion.make_schedule("toy_constant", 10, beta_end=0.1)
    np.testing.assert_allclose(schedule.alphas_cumprod, 0.9 ** np.arange(1, 11), rtol=1e-6)

    SAMPLERS.register("toy_counting", counting_sampler(4))

    def denoise(x, t):  # a fixed, input-dependent "network"
        return 0.5 * x + 0.01 * t[:, None, None, None]

    def run(**kwargs):
        return jax.jit(lambda rng: samplers.sample(denoise, schedule, (2, 4, 4, 3), rng,
                                                    prediction="eps", clip_x0=False,
                                                    **kwargs))(jax.random.PRNGKey(0))

    ddim = run(sampler="ddim", num_steps=4, eta=0.0, spacing="linspace")  # the toy's spacing
    np.testing.assert_allclose(run(sampler="toy_counting"), ddim, rtol=1e-6)
    np.testing.assert_allclose(run(sampler="toy_counting", options={"scale": 2.0}), 2 * ddim,
                               rtol=1e-6)


def test_registered_entries_and_an_evaluator_train_and_sample_by_name(toys, tmp_path):
    """A registered data source, schedule and sampler train and sample by name; a registered
    evaluator (docs/extending.md: a class and a registered factory) runs in the loop every
    `every_steps` and at the end, and what it writes reaches TensorBoard."""
    SAMPLERS.register("toy_counting", counting_sampler(3))
    seen = []

    class WeightNorm(train.Evaluator):
        name = "weight norm"
        every_steps = 2

        def evaluate(self, step, params):
            norm = float(np.sqrt(sum(np.sum(np.square(p)) for p in jax.tree.leaves(params))))
            seen.append(step)
            self.run.writer.write_scalars(step, {"weight_norm": norm})
            return True

    config = micro_config()
    config.data.source = "toy_gray"
    config.diffusion.schedule, config.diffusion.num_timesteps = "toy_constant", 50
    config.diffusion.beta_end = 0.05
    config.sample.sampler, config.sample.num_steps = "toy_counting", 3
    config.sample.scale = 2.0  # the toy sampler's knob, as a config field
    config.num_train_steps, config.sample_every_steps = 5, 0
    config_checks.validate(config, device_count=4)
    workdir = str(tmp_path / "run")
    train.EVALUATORS.register("toy_weight_norm", WeightNorm)
    try:
        state = train.train_and_evaluate(config, workdir)
    finally:
        train.EVALUATORS.unregister("toy_weight_norm")
    assert int(state.step) == 5
    assert seen == [2, 4, 5]
    assert read_events(workdir)["weight_norm"] == [2, 4, 5]
    assert "loss" in read_events(workdir)
    # The loop's sampler, built from config.sample as the loop builds it.
    settings = SamplerSettings.from_config(config.sample)
    assert settings.options == {"scale": 2.0}
    mesh = train.create_mesh(config)
    images = compiled_sampler.make_sample_fn(config, mesh, settings, num_images=4)(
        state.params, jax.random.PRNGKey(0))
    assert images.shape == (4, 8, 8, 3) and np.all(np.isfinite(images))
    config.sample.sampler = "toy_missing"
    with pytest.raises(config_checks.ConfigError, match="toy_counting"):
        config_checks.validate(config, device_count=4)
