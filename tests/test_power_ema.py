"""EDM2's power-function EMA and its post-hoc reconstruction (`core/power_ema.py`,
`ema_snapshots.py`, `ema.py`): the math against its definitions, the training update
against EDM2's code transcribed in NumPy, and a tiny run end to end (snapshots, bitwise
resume, reconstruction, the FID sweep)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import ema, ema_snapshots, evaluate, fid, fid_math, inception, runs, train
from ddpm_jax.core import power_ema
from ddpm_jax.train import config_checks
from tests.helpers import ROOT, command_env, micro_config, run_train_steps
from tests.test_fid import synthetic_state_dict


def edm2_gamma(sigma_rel):
    """EDM2's `std_to_exp` (training/phema.py): the largest real root of its cubic."""
    t = sigma_rel ** -2
    return np.roots([1, 7, 16 - t, 12 - t]).real.max()


def edm2_beta(sigma_rel, t):
    """EDM2's `power_function_beta(std, t)`: (1 - 1/t)^(gamma + 1)."""
    return (1 - 1 / t) ** (edm2_gamma(sigma_rel) + 1)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, 0.28])
def test_gamma_of_sigma_rel_gives_a_profile_of_that_relative_std(sigma_rel):
    gamma = power_ema.gamma_of(sigma_rel)
    assert gamma == pytest.approx(edm2_gamma(sigma_rel), rel=1e-12)
    # the std of the density (gamma+1) tau^gamma on [0, 1], by quadrature
    tau = (np.arange(2_000_000) + 0.5) / 2_000_000
    density = (gamma + 1) * tau**gamma / 2_000_000
    mean = (tau * density).sum()
    assert np.sqrt(((tau - mean) ** 2 * density).sum()) == pytest.approx(sigma_rel, rel=1e-5)
    assert power_ema.sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_the_published_exponents_and_the_longest_ema():
    assert power_ema.gamma_of(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2, section 3.1
    assert power_ema.gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    assert power_ema.gamma_of(power_ema.MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-6)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="not in"):
            power_ema.gamma_of(bad)


def test_profile_products_equal_the_integrals_of_the_profiles():
    def profile(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)

    tau = (np.arange(1_000_000) + 0.5) / 1_000_000 * 500
    for t_a, g_a, t_b, g_b in [(300, 6.94, 500, 16.97), (500, 2.0, 120, 0.5), (200, 3, 200, 3)]:
        numeric = (profile(t_a, g_a, tau) * profile(t_b, g_b, tau)).sum() * 500 / 1_000_000
        assert power_ema.profile_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)


def test_a_stored_profile_is_reconstructed_as_itself():
    steps = [100, 200, 300] * 2
    sigma_rels = [0.05] * 3 + [0.10] * 3
    coefficients, error = power_ema.reconstruction(steps, sigma_rels, 300, 0.10)
    np.testing.assert_allclose(coefficients, [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert error < 1e-6


def track_emas(trajectory, sigma_rels):
    """EDM2's PowerFunctionEMA.update after each step t = 1, 2, ... (the EMA starts as the
    first weights: beta_1 = 0), transcribed: ema.lerp_(p, 1 - beta); every EMA at every step."""
    emas = {s: [] for s in sigma_rels}
    current = {s: np.zeros_like(trajectory[0]) for s in sigma_rels}
    for t, weights in enumerate(trajectory, start=1):
        for s in sigma_rels:
            current[s] = current[s] + (weights - current[s]) * (1 - edm2_beta(s, t))
            emas[s].append(current[s])
    return emas


def test_a_third_ema_length_is_reconstructed_from_two_within_half_a_percent():
    """A synthetic training trajectory (a decaying drift plus a random walk, 4000 steps):
    the EMA of sigma_rel 0.07 reconstructed from snapshots of 0.05 and 0.10 every 200 steps
    is within 0.5% of the directly tracked one, measured against how far that EMA lies from
    the last weights (the averaging it does)."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 4001)[:, None]
    trajectory = (np.exp(-steps / 800) * rng.normal(size=64)
                  + np.cumsum(rng.normal(size=(4000, 64)), 0) / 60)
    emas = track_emas(trajectory, (0.05, 0.07, 0.10))
    snapshot_steps = list(range(200, 4001, 200))
    inputs = [(s, rel) for rel in (0.05, 0.10) for s in snapshot_steps]
    coefficients, fit_error = power_ema.reconstruction(
        [s for s, _ in inputs], [rel for _, rel in inputs], 4000, 0.07)
    reconstructed = sum(c * emas[rel][s - 1] for c, (s, rel) in zip(coefficients, inputs,
                                                                    strict=True))
    direct = emas[0.07][-1]
    error = np.linalg.norm(reconstructed - direct) / np.linalg.norm(direct - trajectory[-1])
    print(f"reconstruction error {error:.4f} of the averaging, profile fit {fit_error:.1e}")
    assert error < 0.005 and fit_error < 0.01


def power_config():
    config = micro_config()
    config.ema.kind = "power"
    config.ema.sigma_rels = (0.10, 0.05)
    config.ema.snapshot_every_steps = 1
    config.sample_every_steps = 0
    return config


def test_the_train_steps_power_emas_equal_edm2s_update(tmp_path):
    config = power_config()
    mesh = train.create_mesh(config, jax.devices()[:1])
    batches = [np.random.default_rng(i).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
               for i in range(3)]
    trajectory, state = [], train.create_train_state(config, mesh)
    step_fn = train.make_train_step(config, mesh)
    for batch in batches:
        state, _ = step_fn(state, train.global_batch(batch, mesh))
        trajectory.append(np.asarray(state.params["conv_in"]["kernel"]))
    assert not np.allclose(trajectory[0], trajectory[-1])
    want = track_emas(trajectory, (0.10, 0.05))
    for ema_params, sigma_rel in zip(state.emas(), (0.10, 0.05), strict=True):
        np.testing.assert_allclose(ema_params["conv_in"]["kernel"], want[sigma_rel][-1],
                                   rtol=1e-5, atol=1e-7)
    # and the exponential EMA is still the one EMA, with its decay
    config.ema.kind = "exponential"
    exponential, _ = run_train_steps(config, mesh, batches[:1])
    assert type(exponential) is train.TrainState


@pytest.mark.parametrize("change, message", [
    (dict(kind="polynomial"), "ema.kind"),
    (dict(kind="power", sigma_rels=(0.05, 0.3)), "ema.sigma_rels: sigma_rel 0.3 is not in"),
    (dict(kind="power", sigma_rels=()), "name one or more different"),
    (dict(kind="power", snapshot_every_steps=-1), "ema.snapshot_every_steps"),
])
def test_bad_ema_settings_are_refused_before_any_work(change, message):
    config = micro_config()
    for key, value in change.items():
        config.ema[key] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate(config)


def snapshot_arrays(workdir):
    manager = ema_snapshots.make_manager(ema_snapshots.directory(workdir), write=False)
    like = train.train_state_shapes(power_config()).params
    found = {}
    for step in manager.all_steps():
        weights = {(step, k): 1.0 for k in range(2)}
        found[step] = jax.tree.leaves(ema_snapshots.weighted_sum(
            str(workdir), {step: [0.1, 0.05]}, weights, like))
    manager.close()
    return found


@pytest.mark.slow
def test_a_power_ema_run_resumes_bitwise_and_reconstructs_and_sweeps(tmp_path):
    config = power_config()
    straight, split = tmp_path / "straight", tmp_path / "split"
    config.num_train_steps = 4
    final = train.train_and_evaluate(config, str(straight))
    config.num_train_steps = 2
    train.train_and_evaluate(config, str(split))
    config.num_train_steps = 4
    resumed = train.train_and_evaluate(config, str(split))
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ema_snapshots.steps(str(straight)) == ema_snapshots.steps(str(split)) == [1, 2, 3, 4]
    for a, b in zip(snapshot_arrays(straight).values(), snapshot_arrays(split).values(),
                    strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)

    # A stored length at the last snapshot is that EMA (here the state's second one).
    made = ema.reconstruct(str(straight), 0.05)
    assert made["step"] == 4 and made["output"].endswith("posthoc_ema/sigma_rel_0.050")
    config_out, params, step, _ = runs.load_run(made["output"])
    assert step == 4 and config_out.ema.kind == "exponential"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final.more_emas[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert ema.reconstruct(str(straight), 0.05)["output"] == made["output"]  # reused
    with pytest.raises(ValueError, match="no EMA snapshot of step 7"):
        ema.reconstruct(str(straight), 0.07, step=7)

    # The command, then sampling the written run.
    out = tmp_path / "ema_0.08"
    command = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.ema", "reconstruct", f"--workdir={straight}",
         "--sigma_rel=0.08", "--step=3", f"--output={out}"],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr[-3000:]
    assert json.loads(command.stdout.splitlines()[-1])["step"] == 3
    assert json.loads((out / ema.NOTE).read_text())["sigma_rel"] == 0.08
    assert runs.run_config(str(out))[1] == 3

    # The FID sweep over EMA lengths: a row per length, a chart.
    weights = str(tmp_path / "inception.npz")
    inception.save_npz(synthetic_state_dict(), weights, source="synthetic")
    stats = fid_math.FeatureStatistics()
    stats.update(np.random.default_rng(6).uniform(size=(8, inception.FEATURE_DIM)))
    fid.save_statistics(str(tmp_path / "stats.npz"), stats)
    result = ema.sweep(str(straight), [0.05, 0.12],
                       lambda run: evaluate.sample_fid(run, str(tmp_path / "stats.npz"), weights,
                                                       num_images=4, batch_size=4, num_steps=2),
                       {"fid": "FID", "inception_score": "Inception Score"})
    assert [row["sigma_rel"] for row in result["ema_sweep"]] == [0.05, 0.12]
    assert all(np.isfinite(row["fid"]) for row in result["ema_sweep"])
    assert result["ema_sweep"][0]["fid"] != result["ema_sweep"][1]["fid"]
    chart = np.asarray(Image.open(result["plot"]))
    assert result["plot"].startswith(str(straight)) and (chart < 128).any()

    # The command line: bits/dim of two lengths, a table in --json and a chart.
    table, chart_path = tmp_path / "nll.json", tmp_path / "nll.png"
    command = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.evaluate", "nll", f"--workdir={straight}",
         "--sigma_rels=0.05,0.1", "--num_images=4", "--batch_size=4", f"--json={table}",
         f"--plot={chart_path}"],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr[-3000:]
    rows = json.loads(table.read_text())["ema_sweep"]
    assert [row["sigma_rel"] for row in rows] == [0.05, 0.1]
    assert all(np.isfinite(row["bits_per_dim"]) and row["bits_per_dim"] > 0 for row in rows)
    assert chart_path.exists() and "sigma_rel 0.100" in command.stdout

    # Another length on resume would make the saved EMAs other averages: refused.
    config.ema.sigma_rels = (0.10, 0.07)
    config.num_train_steps = 5
    with pytest.raises(config_checks.ConfigError, match="ema.sigma_rels: checkpoint"):
        train.train_and_evaluate(config, str(split))
