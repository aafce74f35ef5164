"""The train step and loop on tiny configs: learning, sharding invariance, checkpoints, resume."""

import os

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, data_sources, input_pipeline, ops, train
from ddpm_jax.runtime import compiled_sampler
from ddpm_jax.samplers import SamplerSettings
from ddpm_jax.train import config_checks, events, optimizer
from tests.helpers import (
    check_resume_is_exact,
    micro_config,
    read_events,
    run_train_steps,
    tiny_config,
)


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    return rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_train_step_overfits_one_batch():
    config = tiny_config()
    config.learning_rate = 2e-3
    config.warmup_steps = 1
    config.batch_size = 4
    mesh = train.create_mesh(devices=jax.devices()[:1])
    batch = np.zeros((4, 16, 16, 3), np.uint8)
    batch[:, 4:12, 4:12] = 255  # one simple image, repeated
    state, losses = run_train_steps(config, mesh, [batch] * 60)
    assert int(state.step) == 60
    # Fixed images: the denoiser can learn x0 exactly, so the eps loss collapses.
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])


def test_ema_tracks_params_with_the_configured_decay():
    config = micro_config()
    config.ema_warmup = False
    config.ema_decay = 0.5
    mesh = train.create_mesh(devices=jax.devices()[:1])
    state = train.create_train_state(config, mesh)
    params0 = jax.tree.map(np.asarray, state.params)
    state, _ = train.make_train_step(config, mesh)(state, train.global_batch(fixed_batch(config), mesh))
    for e, p0, p1 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params0),
                         jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * np.asarray(p1), rtol=1e-5, atol=1e-7)


def test_a_nonfinite_step_leaves_params_ema_and_optimizer_state_untouched():
    config = micro_config()
    mesh = train.create_mesh(devices=jax.devices()[:2])
    step = train.make_train_step(config, mesh)
    batch = train.global_batch(fixed_batch(config), mesh)
    state, _ = step(train.create_train_state(config, mesh), batch)  # optimizer state non-zero
    # A NaN in one bias makes the loss and every gradient non-finite.
    leaves, treedef = jax.tree.flatten(state.params)
    leaves[0] = leaves[0].at[0].set(np.nan)
    state = state.replace(params=jax.tree.unflatten(treedef, leaves))
    before = jax.tree.map(np.asarray, (state.params, state.ema_params, state.opt_state))
    new_state, metrics = step(state, batch)  # donates `state`
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 2
    after = (new_state.params, new_state.ema_params, new_state.opt_state)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))
    # The same step from finite params moves the weights (the check above is not vacuous).
    kept = jax.tree.leaves(new_state.params)
    kept[0] = kept[0].at[0].set(0.0)
    moved, metrics = step(new_state.replace(params=jax.tree.unflatten(treedef, kept)), batch)
    assert int(metrics["nonfinite"]) == 0
    assert any(not np.array_equal(np.asarray(new), old) for new, old in
               zip(jax.tree.leaves(moved.params)[1:], jax.tree.leaves(before[0])[1:], strict=True))


def test_learning_rate_schedule():
    config = tiny_config()
    config.learning_rate, config.warmup_steps, config.num_train_steps = 1.0, 10, 110
    config.lr_schedule = "cosine"
    schedule = optimizer.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # cosine half way
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)
    config.lr_schedule = "constant"
    assert float(optimizer.learning_rate_schedule(config)(100)) == pytest.approx(1.0)


def test_checkpoint_round_trip_restores_state_and_data_position(tmp_path):
    config = micro_config()
    mesh = train.create_mesh(config)
    source = data_sources.make_source(config.data)
    dataset = input_pipeline.create_dataset(config, source, process_index=0, process_count=1)
    data_iter = iter(dataset)
    state = train.create_train_state(config, mesh)
    step_fn = train.make_train_step(config, mesh)
    for _ in range(2):
        state, _ = step_fn(state, train.global_batch(next(data_iter), mesh))
    manager = checkpointing.make_manager(tmp_path / "ckpt", config)
    checkpointing.save(manager, 2, state, config)
    manager.wait_until_finished()
    expected_next = next(data_iter)

    manager = checkpointing.make_manager(tmp_path / "ckpt", config)
    step, (restored, examples) = checkpointing.newest_readable(manager, lambda step: (
        checkpointing.restore_step(manager, step, train.abstract_train_state(config, mesh)),
        checkpointing.examples_seen(manager, step, {})), repair=False)
    assert (step, examples) == (2, 2 * config.batch_size)
    resumed = iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                 process_count=1, start_example=examples))
    np.testing.assert_array_equal(next(resumed), expected_next)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["conv_in"]["kernel"].sharding.is_equivalent_to(
        train.replicated(mesh), 4)


def test_replicated_arrays_small_and_large_round_trip_over_four_replicas(tmp_path):
    """Arrays under `MIN_SLICE_BYTES_PER_REPLICA` per replica are written whole by one
    replica, larger ones in a slice per replica: both read back bitwise."""
    config = micro_config()
    mesh = train.create_mesh(config)
    assert mesh.devices.size == 4
    # float32 values: each replica's quarter of the bytes is over the minimum
    large = checkpointing.MIN_SLICE_BYTES_PER_REPLICA + 256
    state = {"small": np.arange(10, dtype=np.float32),
             "large": np.random.default_rng(0).normal(size=(large,)).astype(np.float32)}
    state = jax.device_put(state, train.replicated(mesh))
    manager = checkpointing.make_manager(tmp_path / "ckpt", config)
    checkpointing.save(manager, 1, state, config)
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = checkpointing.restore_step(manager, 1, abstract)
    for name in state:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))


@pytest.mark.slow
def test_train_and_evaluate_logs_samples_checkpoints_and_resumes(tmp_path):
    config = micro_config()
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 4
    tags = read_events(workdir)
    for tag in ("loss", "learning_rate", "grad_norm", "steps_per_sec", "images_per_sec"):
        assert tags[tag] == [2, 4], tag
    assert tags["samples"] == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_00000002.png", "step_00000004.png"]

    # Asking for more steps resumes from step 4 instead of starting over.
    config.num_train_steps = 6
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 6
    assert read_events(workdir)["loss"] == [2, 4, 6]


def test_steps_per_dispatch_divides_every_interval_on_cpu(monkeypatch):
    config = micro_config()  # log, sample and save every 2 steps
    assert train.steps_per_dispatch(config) == 2
    config.log_every_steps = config.sample_every_steps = config.save_every_steps = 100
    assert train.steps_per_dispatch(config) == ops.dispatch.CPU_STEPS_PER_DISPATCH == 4
    config.eval_every_steps = 50
    assert train.steps_per_dispatch(config) == 2
    config.log_every_steps = 25
    assert train.steps_per_dispatch(config) == 1
    config.steps_per_dispatch = 3  # chosen: kept, events in between run single steps
    assert train.steps_per_dispatch(config) == 3
    config.steps_per_dispatch = 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert train.steps_per_dispatch(config) == 1


@pytest.mark.slow
def test_loop_keeps_every_event_step_with_several_steps_per_call(tmp_path, monkeypatch):
    """Events off the multiples of steps_per_dispatch still happen at their steps, and the
    run ends where one step per call ends."""
    config = micro_config()
    config.num_train_steps, config.steps_per_dispatch = 11, 2
    config.log_every_steps, config.save_every_steps, config.sample_every_steps = 5, 6, 8
    config.keep_checkpoints = 5
    calls = []
    call = train.StepFunctions.__call__
    monkeypatch.setattr(train.StepFunctions, "__call__",
                        lambda self, state, batches: calls.append(len(batches))
                        or call(self, state, batches))
    workdir = str(tmp_path / "multi")
    multi = train.train_and_evaluate(config, workdir)
    assert calls == [2, 2, 1, 1, 2, 2, 1]  # events at 5, 6, 8, 10 and 11
    tags = read_events(workdir)
    assert tags["loss"] == tags["steps_per_sec"] == [5, 10, 11]
    assert tags["samples"] == [8, 11]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["6", "11"]
    config.steps_per_dispatch = 1
    single = train.train_and_evaluate(config, str(tmp_path / "single"))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_nonfinite_check_names_the_step_inside_a_call():
    check = events.FiniteCheck(micro_config())
    check.add(8, {"nonfinite": np.zeros(4, np.int32), "loss": np.ones(4)})
    check.check_all()
    metrics = {"nonfinite": np.array([0, 1, 1, 0], np.int32),
               "loss": np.array([1.0, np.nan, np.inf, 1.0])}
    check.add(8, metrics)
    with pytest.raises(train.NonFiniteError, match=r"at step 6 \(loss=nan\)"):
        check.check_all()


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    config = micro_config()
    config.sample_every_steps = 0  # no sample grids: only the state is compared
    check_resume_is_exact(config, tmp_path)
    assert not (tmp_path / "straight" / "samples").exists()  # sample_every_steps=0: no grids
    assert "samples" not in read_events(str(tmp_path / "straight"))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("batch_size", 6, "divisible by the 4 devices"),
        ("num_train_steps", 0, "num_train_steps must be a positive"),
        ("diffusion.schedule", "sigmoid", "diffusion.schedule"),
        ("diffusion.prediction", "score", "diffusion.prediction"),
        ("sample.sampler", "leapfrog", "sample.sampler"),
        ("sample.spacing", "cubic", "sample.spacing"),
        ("data.image_size", 17, "divisible by 2"),
        ("model.attention_resolutions", (3,), "only has resolutions"),
        ("data.source", "hub", "data.source"),
        ("steps_per_dispatch", -1, "steps_per_dispatch"),
    ],
)
def test_bad_configs_fail_before_any_work(tmp_path, field, value, match):
    config = tiny_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(config_checks.ConfigError, match=match):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_unwritable_workdir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(config_checks.ConfigError, match="not writable"):
        config_checks.validate(tiny_config(), str(blocker / "run"), device_count=4)


@pytest.mark.slow
def test_loss_and_in_loop_sampler_honour_the_prediction_target():
    """The freshly built net outputs exactly 0 (zero-initialised last conv), which pins down
    what each target means: loss = mean(x0^2) for x0 prediction, and DDIM eta=0 sampling
    with an x0 prediction of 0 ends exactly at 0."""
    config = micro_config()
    mesh = train.create_mesh(devices=jax.devices()[:1])
    batch = np.full((config.batch_size, 8, 8, 3), 191, np.uint8)
    x0 = 191 / 127.5 - 1
    finals = {}
    for prediction in ("eps", "x0", "v"):
        config.diffusion.prediction = prediction
        state = train.create_train_state(config, mesh)
        sample_fn = compiled_sampler.make_sample_fn(config, mesh, SamplerSettings("ddim", 5, {"eta": 0.0}),
                                            num_images=4)
        finals[prediction] = np.asarray(sample_fn(state.params, jax.random.PRNGKey(0)))
        if prediction == "x0":  # the loss of the other targets is noise-dependent
            _, metrics = train.make_train_step(config, mesh)(state, train.global_batch(batch, mesh))
            assert float(metrics["loss"]) == pytest.approx(x0**2, rel=1e-5)
    np.testing.assert_array_equal(finals["x0"], 0.0)
    assert np.abs(finals["eps"]).mean() > 0.1 and np.abs(finals["v"]).mean() > 0.1
    assert not np.allclose(finals["eps"], finals["v"])


def test_the_eta_counts_training_time_only_and_adds_the_evaluations_to_come(monkeypatch):
    from ddpm_jax import progress

    now = [100.0]
    monkeypatch.setattr("time.perf_counter", lambda: now[0])
    report = progress.TrainingProgress(first_step=0, num_train_steps=100, batch_size=8,
                                       every_seconds=30)
    now[0] += 10.0  # 10 steps in 10 s
    assert report.line(10, 0.5, {"sample grid": 2}) == (
        "step 10/100 (10%): loss 0.5000, 1.00 steps/s (8.0 images/s), ETA 1m30s of training")
    report.evaluation("sample grid", 40.0)  # a grid that took 40 s (its first: it compiled)
    report.evaluation("sample grid", 20.0)
    now[0] += 60.0 + 10.0  # the grids, then 10 more steps
    line = report.line(20, 0.25, {"sample grid": 2, "FID": 1})
    # 20 steps in 20 s of training: the grids do not slow the rate; the latest grid's time
    # counts for those to come; no FID has been timed yet
    assert line.endswith("1.00 steps/s (8.0 images/s), ETA 1m20s of training + 40 s for 2 "
                         "sample grids")
    assert report.line(21, 0.25, {}) is None  # at most every 30 s
    assert report.training_seconds() == pytest.approx(20.0)
    assert [progress.format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1m05s", "1h02m"]


def test_the_loop_counts_the_events_still_to_come():
    config = micro_config()
    config.num_train_steps = 10
    # every 4 steps and at the end: 4, 8, 10
    assert [train.events_left(config, step, 4) for step in (0, 3, 4, 8, 9, 10)] == [3, 3, 2, 1, 1, 0]
    assert train.events_left(config, 0, 5) == 2 and train.events_left(config, 0, 0) == 0
