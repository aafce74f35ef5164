"""Training: the state (`state.py`), one step (`step.py`), the loop and its set-up
(`loop.py`), the events between steps (`events.py`) and the optimizer (`optimizer.py`).

`train_and_evaluate(config, workdir)` is the whole of a run; the names below are what
commands, benchmarks and tests use.
"""

from ddpm_jax.checkpointing import absolute_path
from ddpm_jax.runtime.compiled_step import StepFunctions, global_batch, global_batches
from ddpm_jax.runtime.sharding import create_mesh, replicated
from ddpm_jax.train.events import EVALUATORS, Evaluator, Event, NonFiniteError
from ddpm_jax.train.loop import (
    event_intervals,
    events_left,
    host_memory_parts,
    make_train_step,
    model_flops_per_step,
    step_functions,
    steps_per_dispatch,
    train_and_evaluate,
)
from ddpm_jax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    init_train_state,
    train_state_from_params,
    train_state_shapes,
    train_state_shardings,
)
from ddpm_jax.train.step import example_randomness, images_to_model_space, train_step

__all__ = ["EVALUATORS", "Evaluator", "Event", "NonFiniteError", "StepFunctions", "TrainState",
           "absolute_path", "abstract_train_state", "create_mesh", "create_train_state",
           "event_intervals", "events_left", "example_randomness", "global_batch",
           "global_batches", "host_memory_parts", "images_to_model_space", "init_train_state",
           "make_train_step", "model_flops_per_step", "replicated", "step_functions", "steps_per_dispatch",
           "train_and_evaluate", "train_state_from_params", "train_state_shapes",
           "train_state_shardings", "train_step"]
