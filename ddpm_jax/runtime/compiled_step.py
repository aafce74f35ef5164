"""The train step compiled for a mesh and a backend: where the backend policy meets the step.

The step function (`train.step.train_step`) is written without any of this: here it gets
its micro-batch count (gradient accumulation times the backend's compute chunks, `ops`),
the compiler options, the state's and the batch's shardings, buffer donation, and
`steps_per_call` steps per compiled call (a `lax.scan`). `StepFunctions` compiles each form
once, ahead of time, and checks that the one training runs fits in memory.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import ops
from ddpm_jax.runtime import memory, sharding

StepFn = Callable[..., tuple[Any, dict[str, jax.Array]]]  # fn(state, batch, *, micro_batches)


def steps_per_call(config: ml_collections.ConfigDict, event_intervals: Sequence[int]) -> int:
    """Train steps each compiled call runs for `config` on this backend
    (`ops.steps_per_dispatch`): a divisor of every interval at which the loop does something."""
    return ops.steps_per_dispatch(config, event_intervals)


def jit_step(step_fn: StepFn, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             state_shardings: Any, num_steps: int = 1):
    """`step_fn` jitted: state in its mesh sharding and donated, batch split over devices.

    With `num_steps` > 1, `fn(state, batches)` runs that many steps in one call (a `lax.scan`
    over `batches` [num_steps, batch, ...]) and returns metrics with a leading [num_steps]
    axis: the same steps, with one dispatch and one set of temporary buffers for all of them.
    """
    accum = config.grad_accum_steps
    per_device = config.batch_size // (mesh.devices.size * accum)
    fn = functools.partial(step_fn, micro_batches=accum * ops.compute_chunks(config, per_device))
    data_sharding = sharding.batch_sharding(mesh)
    if num_steps > 1:
        fn = functools.partial(jax.lax.scan, fn)
        data_sharding = sharding.stacked_batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=ops.compiler_options(config))


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Assembles the global sharded batch (an array, or a dict of them: images and labels)
    from each process's slice."""
    where = sharding.batch_sharding(mesh)
    return jax.tree.map(lambda part: jax.make_array_from_process_local_data(where, part),
                        local_batch)


def global_batches(local_batches: list[Any], mesh: jax.sharding.Mesh) -> Any:
    """Several steps' batches, stacked [steps, batch, ...], from each process's slices."""
    where = sharding.stacked_batch_sharding(mesh)
    return jax.tree.map(lambda *parts: jax.make_array_from_process_local_data(
        where, np.stack(parts)), *local_batches)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   steps: int = 1) -> Any:
    """Shapes, dtypes and shardings of one call's global batch: uint8 images [B, S, S, 3]
    and, with `data.label`, int32 labels [B] (a leading [steps] axis for several steps)."""
    leading = (steps,) if steps > 1 else ()
    where = sharding.stacked_batch_sharding(mesh) if steps > 1 else sharding.batch_sharding(mesh)
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((*leading, config.batch_size, size, size, 3), jnp.uint8,
                                  sharding=where)
    if not config.data.get("label"):
        return images
    labels = jax.ShapeDtypeStruct((*leading, config.batch_size), jnp.int32, sharding=where)
    return {"image": images, "label": labels}


class StepFunctions:
    """The train step as one step per call, and as `per_call` steps per call:
    `fns(state, local_batches)` runs one step per local batch, in one call.

    Each is compiled on its first use (`compiled`): a run whose events (logging, samples,
    checkpoints, FID, its end) all fall on multiples of `per_call` from its start only ever
    compiles the second. The training loop and the benchmarks call it.
    """

    def __init__(self, step_fn: StepFn, abstract_state: Any, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh, per_call: int):
        self.step_fn, self.abstract_state = step_fn, abstract_state
        self.state_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
        self.config, self.mesh, self.per_call = config, mesh, per_call
        self._compiled: dict[int, Any] = {}
        logging.info("%d train steps per call", per_call)

    def compiled(self, steps: int):
        """The step function running `steps` steps per call, compiled ahead of time."""
        if steps not in self._compiled:
            batch = abstract_batch(self.config, self.mesh, steps)
            started = time.perf_counter()
            logging.info("compiling the train step (%d step%s per call)...", steps,
                         "s" if steps > 1 else "")
            fn = jit_step(self.step_fn, self.config, self.mesh, self.state_shardings, steps)
            self._compiled[steps] = fn.lower(self.abstract_state, batch).compile()
            logging.info("compiled the train step in %.1f s", time.perf_counter() - started)
        return self._compiled[steps]

    def check_memory(self, host: dict[str, int]) -> None:
        """Compiles the form training runs (no extra work: it is needed anyway) and raises
        `memory.MemoryCheckError` when it, with the `host` parts, cannot fit."""
        memory.check_step_fits(self.compiled(self.per_call), host=host)

    def steps_in_next_call(self, step: int, next_event: int) -> int:
        """`per_call` steps where no event falls inside them, else one."""
        return self.per_call if step + self.per_call <= next_event else 1

    def __call__(self, state: Any, local_batches: list[np.ndarray]):
        if len(local_batches) == 1:
            return self.compiled(1)(state, global_batch(local_batches[0], self.mesh))
        return self.compiled(len(local_batches))(state, global_batches(local_batches, self.mesh))
