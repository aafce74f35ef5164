"""One training step (Ho et al., Algorithm 1; with `diffusion.formulation="edm"`, EDM's
training of Karras et al. 2022), as a pure function of the state and a batch.

Every example draws its own noise level, noise and dropout masks (`example_randomness`), so a
step gives the same result however its batch is cut into devices, chunks or micro-batches.
How the step is compiled, sharded and cut into micro-batches for a backend is the
runtime's (`ddpm_jax.runtime.compile`); this file knows none of it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ddpm_jax import recipe
from ddpm_jax.core import augment, diffusion, edm, objectives, power_ema
from ddpm_jax.runtime import network
from ddpm_jax.train.state import TrainState, is_power_ema


def images_to_model_space(batch: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return batch.astype(jnp.float32) / 127.5 - 1.0


def ema_decays_at(config: ml_collections.ConfigDict, step: jax.Array) -> tuple[jax.Array, ...]:
    """The decay of each EMA in the update that follows `step` steps.

    Exponential: `config.ema_decay`, ramped up over the first steps with `config.ema_warmup`.
    Power (`ema.kind="power"`): beta_t = (1 - 1/t)^(gamma + 1) of each `ema.sigma_rels`, t =
    step + 1 the steps taken with this one (`power_ema.beta`).
    """
    if is_power_ema(config):
        return tuple(power_ema.beta(step + 1, power_ema.gamma_of(sigma_rel))
                     for sigma_rel in config.ema.sigma_rels)
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if config.ema_warmup:
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return (decay,)


def example_randomness(
    rng: jax.Array, image_shape: tuple[int, ...], num_timesteps: int,
    edm_settings: edm.EDMSettings | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example i of a batch: its noise level (a timestep in [0, num_timesteps), or with
    `edm_settings` EDM's log-normal sigma), its noise and its dropout key.

    Each is drawn from `fold_in(rng, i)` alone (i the example's index in the global batch),
    so an example gets the same draws however the batch is split over devices, chunks or
    micro-batches.
    """

    def draw(key):
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        if edm_settings is None:
            t = objectives.sample_timesteps(t_key, 1, num_timesteps)[0]
        else:
            t = edm.training_sigma(t_key, edm_settings)
        return t, jax.random.normal(noise_key, image_shape[1:], jnp.float32), dropout_key

    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(image_shape[0]))
    return jax.vmap(draw)(keys)


def dropped_labels(rng: jax.Array, labels: jax.Array, rate: float, null_label: int
                   ) -> jax.Array:
    """`labels` with each replaced by the null label with probability `rate` (classifier-free
    guidance's joint training of the conditional and unconditional model). Example i's
    draw comes from `fold_in(fold_in(rng, i), 3)` alone, like its other draws
    (`example_randomness`), so it does not depend on how the batch is split."""
    if rate == 0.0:
        return labels
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(labels.shape[0]))
    drop = jax.vmap(lambda key: jax.random.bernoulli(jax.random.fold_in(key, 3), rate))(keys)
    return jnp.where(drop, null_label, labels)


def augmented(rng: jax.Array, x0: jax.Array, settings: augment.AugmentSettings
              ) -> tuple[jax.Array, jax.Array]:
    """(x0 with EDM's non-leaky augmentation, the vectors the net is told [B, D]). Example
    i draws from `fold_in(fold_in(rng, i), 4)` alone, like its other draws, so it does not
    depend on how the batch is split."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(x0.shape[0]))
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 4)
    return jax.vmap(augment.augment, (0, 0, None))(keys, x0, settings)


def split_batch(batch: jax.Array | dict) -> tuple[jax.Array, jax.Array | None]:
    """(uint8 images, int32 labels or None) of a batch from the input pipeline."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch, None


def mean_gradient(grad_fn, params: Any, inputs: tuple, micro_batches: int):
    """`grad_fn(params, *inputs)` -> ((loss, aux), grads), loss and aux scalars, averaged
    over `micro_batches` sequential slices of the batch (of every array in `inputs`): the
    same value as one pass (to float rounding), in less memory. Slice i takes rows i,
    i + micro_batches, ...: with the batch split over devices in contiguous blocks, every
    device holds an equal share of every slice."""
    if micro_batches == 1:
        return grad_fn(params, *inputs)

    def micro(array, i):
        array = array.reshape((array.shape[0] // micro_batches, micro_batches) + array.shape[1:])
        return jax.lax.dynamic_index_in_dim(array, i, axis=1, keepdims=False)

    # A loop, so that the slices run one after another and compile once.
    def accumulate(total, i):
        value = grad_fn(params, *jax.tree.map(lambda array: micro(array, i), inputs))
        return jax.tree.map(lambda a, b: a + b / micro_batches, total, value), None

    zeros = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
             jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(accumulate, zeros, jnp.arange(micro_batches))
    return total


def train_step(
    state: TrainState,
    batch: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    schedule: diffusion.Schedule,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (uint8 images, or a dict of images and their
    class labels); returns the new state and scalar metrics.

    The loss is `objectives.loss_terms` at a random timestep per example; the gradient is
    the mean over `micro_batches` sequential slices of the batch (`mean_gradient`). A
    class-conditional net sees each example's label, or with probability
    `config.label_dropout` the null label (`dropped_labels`). With `data.augment` on, the
    net learns from augmented images and is told their augmentation (`augmented`).
    """
    images, labels = split_batch(batch)
    x0 = images_to_model_space(images)
    step_rng = jax.random.fold_in(state.rng, state.step)
    conditioning = {}
    augment_settings = recipe.augment_settings(config)
    if augment_settings is not None:
        x0, conditioning["augment_labels"] = augmented(step_rng, x0, augment_settings)
    edm_settings = recipe.edm_settings(config) if recipe.is_edm(config) else None
    t, noise, dropout_keys = example_randomness(step_rng, x0.shape, schedule.num_timesteps,
                                                edm_settings)
    # x_t: x0 + sigma * noise for EDM (t is sigma), else q(x_t | x0) at timestep t
    x_t = (x0 + t[:, None, None, None] * noise if edm_settings is not None
           else diffusion.q_sample(schedule, x0, t, noise))
    if labels is not None:
        conditioning["class_labels"] = dropped_labels(
            step_rng, labels, config.get("label_dropout", 0.0), config.model.num_classes)
    objective = recipe.objective(config)
    learned = objective.variance == "learned_range"
    use_dropout = config.model.dropout > 0

    def loss_fn(params, x0, x_t, t, noise, dropout_keys, conditioning):
        keys = dropout_keys if use_dropout else None
        if edm_settings is not None:  # EDM: F(c_in x; c_noise), loss of D = c_skip x + c_out F
            net_input, c_noise = edm.network_inputs(x_t, t, edm_settings)
            output = network.apply(graphdef, params, net_input, c_noise, keys, **conditioning)
            return jnp.mean(edm.loss(output, x_t, x0, t, edm_settings)), jnp.zeros(())
        output = network.apply(graphdef, params, x_t, t, keys, **conditioning)
        loss, vlb = objectives.loss_terms(schedule, output, x0, x_t, t, noise, objective)
        return jnp.mean(loss), (jnp.mean(vlb) if learned else jnp.zeros(()))

    inputs = (x0, x_t, t, noise, dropout_keys, conditioning)
    (loss, vlb), grads = mean_gradient(jax.value_and_grad(loss_fn, has_aux=True), state.params,
                                       inputs, micro_batches)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient never reaches the weights: the step keeps the old
    # params, EMA and optimizer state (the loop then stops or goes on, by config.on_nonfinite).
    # A conditional, not a select per leaf, which would make XLA copy every leaf it updates.
    new_state = jax.lax.cond(
        finite, lambda s: s.apply_gradients(grads, ema_decays_at(config, s.step)),
        lambda s: s, state)
    metrics = {
        "loss": loss,
        **({"vlb_bits_per_dim": vlb} if learned else {}),
        "grad_norm": grad_norm,
        "learning_rate": state.tx.learning_rate_at(state.step),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state.replace(step=state.step + 1), metrics
