"""EDM (Karras et al. 2022): its samplers on the exact Gaussian denoiser against float64
recursions written from the paper, its sigma grid, its loss against a NumPy transcription
of EDM's `EDMPrecond` and `EDMLoss`, and a tiny EDM-formulation run end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.core import diffusion, edm
from ddpm_jax.samplers import SamplerSettings

T = 1000
MEAN, STD = 0.3, 0.5  # the Gaussian data of the oracle
SHAPE = (512, 4)


def discrete_table():
    """sigma_t = sqrt((1 - abar_t) / abar_t) of Ho et al.'s linear schedule, in float64."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    return np.sqrt((1.0 - abar) / abar)


def oracle(x, sigma):
    """E[y | y + sigma n = x] for y ~ N(MEAN, STD^2): the exact denoiser D(x; sigma)."""
    return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


def engine_noise(rng, num_calls):
    """The normal draws the engine makes (x_T first, then one per network call)."""
    init_rng, loop_rng = jax.random.split(rng)
    initial = np.asarray(jax.random.normal(init_rng, SHAPE, jnp.float32), np.float64)
    calls = [np.asarray(jax.random.normal(k, SHAPE, jnp.float32), np.float64)
             for k in jax.random.split(loop_rng, num_calls)]
    return initial, calls


def edm_reference(sigmas, initial, call_noise, *, heun, round_sigma=lambda s: s, s_churn=0.0,
                  s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, euler_first=False):
    """EDM Algorithm 2 (Algorithm 1 at s_churn = 0) in float64 on the oracle. The noise that
    takes x_i to x_hat_i is the draw of the call that finished step i - 1 (the initial draw
    for step 0, where x_hat_0 = sqrt(t_0^2 + churn_0^2) n, the sum of the two draws)."""
    t = np.append(sigmas, 0.0)
    count = len(sigmas)
    gammas = [min(s_churn / count, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
              for s in sigmas]
    t_hat = [round_sigma(s * (1 + g)) if g > 0 else s for s, g in zip(sigmas, gammas, strict=True)]
    churn = [math.sqrt(max(h**2 - s**2, 0.0)) * s_noise for h, s in zip(t_hat, sigmas, strict=True)]
    x = math.sqrt(t[0] ** 2 + churn[0] ** 2) * initial
    calls = 0
    for i in range(count):
        d = (x - oracle(x, t_hat[i])) / t_hat[i]
        x_next = x + (t[i + 1] - t_hat[i]) * d
        calls += 1
        if heun and t[i + 1] > 0 and not (euler_first and i == 0):
            d_prime = (x_next - oracle(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat[i]) * (0.5 * d + 0.5 * d_prime)
            calls += 1
        if i + 1 < count:
            x_next = x_next + churn[i + 1] * call_noise[calls - 1]
        x = x_next
    return x, calls


def run_engine(sampler, num_calls, rng, preconditioning=None, **options):
    schedule = diffusion.make_schedule("linear", T)
    if preconditioning is None or not preconditioning.continuous:
        network = diffusion.optimal_gaussian_eps(schedule, MEAN, STD)
    else:
        network = edm.optimal_gaussian_network(preconditioning, MEAN, STD)
    return np.asarray(jax.jit(lambda r: samplers.sample(
        network, schedule, SHAPE, r, sampler=sampler, num_steps=num_calls, options=options,
        clip_x0=False, preconditioning=preconditioning))(rng), np.float64)


def nearest_table_sigma(sigma):
    table = discrete_table()
    return table[np.abs(table - sigma).argmin()]


@pytest.mark.parametrize("sampler,calls,options", [
    ("heun", 35, {}), ("heun", 10, {}), ("euler", 20, {}),
    ("heun", 21, {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
    ("euler", 12, {"s_churn": 10.0}),
])
@pytest.mark.parametrize("continuous", [False, True])
def test_heun_and_euler_equal_a_float64_recursion_of_edm_algorithm_2(sampler, calls, options,
                                                                     continuous):
    rng = jax.random.PRNGKey(7)
    heun = sampler == "heun"
    num_sigmas = calls // 2 + 1 if heun else calls
    if continuous:
        preconditioning = edm.EDMPreconditioning()
        sigmas = (80.0 ** (1 / 7) + np.linspace(0, 1, num_sigmas)
                  * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # EDM eq. (5)
        round_sigma = lambda s: s  # noqa: E731
    else:
        preconditioning = None
        table = discrete_table()
        sigmas = (table[-1] ** (1 / 7) + np.linspace(0, 1, num_sigmas)
                  * (table[0] ** (1 / 7) - table[-1] ** (1 / 7))) ** 7
        sigmas = np.array([nearest_table_sigma(s) for s in sigmas])
        assert len(set(sigmas)) == num_sigmas  # no rounding collisions at these counts
        round_sigma = nearest_table_sigma
    initial, noise = engine_noise(rng, calls)
    want, used = edm_reference(sigmas, initial, noise, heun=heun, round_sigma=round_sigma,
                               euler_first=heun and calls % 2 == 0, **options)
    assert used == calls  # num_steps counts network calls
    got = run_engine(sampler, calls, rng, preconditioning, **options)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_churn_zero_is_algorithm_1_bit_for_bit_and_deterministic():
    """Churn only inside [s_tmin, s_tmax]: a window that holds no sigma runs Algorithm 1
    exactly, whatever s_churn says, and Algorithm 1 ignores every per-call draw."""
    a = run_engine("heun", 15, jax.random.PRNGKey(0))
    b = run_engine("heun", 15, jax.random.PRNGKey(0), s_churn=80.0, s_tmin=500.0, s_noise=1.1)
    np.testing.assert_array_equal(a, b)
    churned = run_engine("heun", 15, jax.random.PRNGKey(0), s_churn=80.0)
    assert np.abs(churned - a).max() > 1e-2
    # Same x_T, other per-call draws: Algorithm 1 gives the same samples.
    plan = samplers.reverse_plan(diffusion.make_schedule("linear", T), SHAPE,
                                 SamplerSettings("heun", 15), clip_x0=False)
    schedule = diffusion.make_schedule("linear", T)
    network = diffusion.optimal_gaussian_eps(schedule, MEAN, STD)

    def with_step_keys(seed):
        x, state, snapshots, _ = samplers.reverse_init(plan, jax.random.PRNGKey(0))
        carry = (x, state, snapshots, jax.random.split(jax.random.PRNGKey(seed), 15))
        return samplers.reverse_result(plan, samplers.reverse_steps(plan, network, schedule,
                                                                    carry, 0, 15))
    np.testing.assert_array_equal(jax.jit(lambda: with_step_keys(1))(),
                                  jax.jit(lambda: with_step_keys(2))())


def test_heun_converges_to_the_probability_flow_ode():
    """For Gaussian data the ODE's map from sigma_max to 0 is known:
    x(0) = MEAN + (x(sigma_max) - MEAN) STD / sqrt(STD^2 + sigma_max^2)."""
    preconditioning = edm.EDMPreconditioning()
    rng = jax.random.PRNGKey(3)
    initial, _ = engine_noise(rng, 1)
    exact = MEAN + (80.0 * initial - MEAN) * STD / math.sqrt(STD**2 + 80.0**2)
    errors = {}
    for num_sigmas in (13, 25, 50):
        got = run_engine("heun", 2 * num_sigmas - 1, rng, preconditioning)
        errors[num_sigmas] = np.sqrt(np.mean((got - exact) ** 2)) / STD
    assert errors[50] < 0.01
    assert errors[13] > errors[25] > errors[50]
    assert errors[25] / errors[50] > 3.0  # second order: about 4x per halving of the step


def test_dpm_solver_on_a_continuous_model_matches_its_discrete_twin():
    """DPM-Solver++ is one update on both kinds of model: on EDM's oracle at EDM sigmas it
    samples the data's law, as on the discrete oracle."""
    got = run_engine("dpm_solver++", 20, jax.random.PRNGKey(1), edm.EDMPreconditioning())
    assert got.mean() == pytest.approx(MEAN, abs=0.03)
    assert got.std() == pytest.approx(STD, rel=0.05)


def test_karras_spacing_is_edm_eq_5_rounded_to_the_schedules_sigmas():
    schedule = diffusion.make_schedule("linear", T)
    table = discrete_table()
    for count in (10, 18, 50):
        steps = samplers.sampling_timesteps(schedule, "ddim", count, "karras")
        ramp = np.linspace(0, 1, count)
        want = (table[-1] ** (1 / 7) + ramp * (table[0] ** (1 / 7) - table[-1] ** (1 / 7))) ** 7
        nearest = np.array([np.abs(table - s).argmin() for s in want])
        assert steps[0] == T - 1 and steps[-1] == 0
        assert np.all(np.diff(steps) < 0)
        if len(set(nearest)) == count:
            np.testing.assert_array_equal(steps, nearest)
    # sigma_max narrows the range; rho = 1 spaces sigma itself evenly.
    narrowed = samplers.sampling_timesteps(schedule, "ddim", 10, "karras",
                                           {"sigma_max": 80.0, "rho": 1.0})
    assert table[narrowed[0]] == pytest.approx(nearest_table_sigma(80.0))
    assert abs(table[narrowed[1]] - (80.0 - (80.0 - table[0]) / 9)) < 1.0
    # Heun visits num_steps // 2 + 1 sigmas; EDM's 35 calls are 18 sigmas.
    assert len(samplers.sampling_timesteps(schedule, "heun", 35)) == 18
    assert len(samplers.sampling_timesteps(schedule, "heun", 0)) == 18  # its default
    continuous = samplers.sampling_sigmas(edm.EDMPreconditioning(), SamplerSettings("euler", 18))
    np.testing.assert_allclose(continuous, edm.karras_sigmas(18, 0.002, 80.0), rtol=1e-12)
    assert continuous[0] == pytest.approx(80.0) and continuous[-1] == pytest.approx(0.002)


def test_timestep_samplers_and_spacings_are_refused_on_a_continuous_model():
    schedule = diffusion.make_schedule("linear", T)
    for name in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match="formulation='edm'.*use one of"):
            samplers.reverse_plan(schedule, SHAPE, SamplerSettings(name, 10),
                                  preconditioning=edm.EDMPreconditioning())
    with pytest.raises(ValueError, match="use karras or logsnr|use logsnr or karras"):
        samplers.reverse_plan(schedule, SHAPE, SamplerSettings("heun", 10, spacing="trailing"),
                              preconditioning=edm.EDMPreconditioning())


def test_discrete_preconditioning_is_the_schedules_own_x0():
    """D(x; sigma_t) = c_skip x + c_out F(c_in x, t) is the x0 the DDPM math predicts from
    x_t = sqrt(abar_t) x, for every prediction target."""
    schedule = diffusion.make_schedule("linear", T)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    rng = np.random.default_rng(0)
    steps = np.array([0, 10, 500, 999])
    x0, eps = rng.standard_normal((2, 4, 6))
    for prediction in diffusion.PREDICTIONS:
        pre = edm.DiscretePreconditioning(abar, prediction)
        sigma = pre.sigmas[steps]
        c = pre.coefficients(sigma)
        np.testing.assert_array_equal(c["c_noise"], steps)
        x = x0 + sigma[:, None] * eps  # EDM's x; x_t = sqrt(abar) x
        x_t = np.sqrt(abar[steps])[:, None] * x
        np.testing.assert_allclose(c["c_in"][:, None] * x, x_t, rtol=1e-12)
        target = np.asarray(diffusion.prediction_target(
            schedule, prediction, jnp.asarray(x0, jnp.float32), jnp.asarray(steps),
            jnp.asarray(eps, jnp.float32)), np.float64)
        denoised = c["c_skip"][:, None] * x + c["c_out"][:, None] * target
        np.testing.assert_allclose(denoised, x0, atol=5e-4)


def test_edm_loss_equals_a_numpy_transcription_of_edm_precond_and_loss():
    """EDM's training/loss.py `EDMLoss` and training/networks.py `EDMPrecond`, written out in
    float64 NumPy, on a fixed batch, sigma and noise (the per-pixel loss averaged over the
    pixels of each example)."""
    settings = edm.EDMSettings()
    rng = np.random.default_rng(1)
    y = rng.uniform(-1, 1, (3, 4, 4, 2))
    rnd_normal = rng.standard_normal(3)
    noise = rng.standard_normal(y.shape)
    weights = rng.standard_normal((2, 2))

    def raw_net(x, c_noise, xp):  # any fixed function of the net's two inputs
        return xp.tanh(x @ weights) * 0.7 + c_noise.reshape(-1, 1, 1, 1)

    # EDMLoss.__call__ and EDMPrecond.forward, float64
    sigma = np.exp(rnd_normal * settings.p_std + settings.p_mean)
    weight = (sigma**2 + settings.sigma_data**2) / (sigma * settings.sigma_data) ** 2
    n = noise * sigma[:, None, None, None]
    x = y + n
    s = sigma[:, None, None, None]
    c_skip = settings.sigma_data**2 / (s**2 + settings.sigma_data**2)
    c_out = s * settings.sigma_data / np.sqrt(s**2 + settings.sigma_data**2)
    c_in = 1 / np.sqrt(settings.sigma_data**2 + s**2)
    c_noise = np.log(sigma) / 4
    d_x = c_skip * x + c_out * raw_net(c_in * x, c_noise, np)
    want = (weight[:, None, None, None] * (d_x - y) ** 2).mean(axis=(1, 2, 3))

    drawn = jax.vmap(lambda k: edm.training_sigma(k, settings))(jax.random.split(
        jax.random.PRNGKey(0), 20000))
    assert float(jnp.log(drawn).mean()) == pytest.approx(settings.p_mean, abs=0.03)
    assert float(jnp.log(drawn).std()) == pytest.approx(settings.p_std, rel=0.03)

    sigma32 = jnp.asarray(sigma, jnp.float32)
    x_noisy = jnp.asarray(y, jnp.float32) + sigma32[:, None, None, None] * jnp.asarray(
        noise, jnp.float32)
    net_input, label = edm.network_inputs(x_noisy, sigma32, settings)
    output = raw_net(net_input, label, jnp)
    got = edm.loss(output, x_noisy, jnp.asarray(y, jnp.float32), sigma32, settings)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def edm_config():
    from tests.helpers import micro_config

    config = micro_config()
    config.diffusion.formulation = "edm"
    config.sample.sampler = "heun"
    config.sample.num_steps = 5
    config.eval.sampler = "heun"
    return config


def test_an_edm_step_learns_one_batch():
    from ddpm_jax import train
    from tests.helpers import run_train_steps

    config = edm_config()
    config.learning_rate = 2e-3
    config.warmup_steps = 1
    mesh = train.create_mesh(devices=jax.devices()[:1])
    batch = np.zeros((8, 8, 8, 3), np.uint8)
    batch[:, 2:6, 2:6] = 255
    _, losses = run_train_steps(config, mesh, [batch] * 40, weight_noise=0.05)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


@pytest.mark.slow
def test_an_edm_run_resumes_exactly_samples_with_heun_and_is_refused_where_ddpm_is_assumed(
        tmp_path):
    import subprocess
    import sys

    from ddpm_jax import convert, evaluate, sample, train
    from ddpm_jax.core.errors import UserError
    from tests.helpers import ROOT, check_resume_is_exact, command_env

    config = edm_config()
    config.sample_every_steps = 0
    check_resume_is_exact(config, tmp_path)

    workdir = str(tmp_path / "split")
    output = tmp_path / "heun.png"
    done = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.sample", f"--workdir={workdir}", "--sampler=heun",
         "--num_steps=5", "--num_samples=4", f"--output={output}", "--options=s_churn=10,rho=5"],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert output.exists() and "heun, 5 steps, karras spacing, rho=5.0" in done.stderr
    assert "s_churn=10.0" in done.stderr
    images, _ = sample.generate(workdir, 4, sampler="dpm_solver++", num_steps=4)
    assert images.shape == (4, 8, 8, 3)

    with pytest.raises(UserError, match="heun with the karras spacing has no option eta"):
        sample.generate(workdir, 4, sampler="heun", options={"eta": 1.0})
    with pytest.raises(UserError, match="ddpm sampler steps between the timesteps"):
        sample.generate(workdir, 4, sampler="ddpm")
    with pytest.raises(UserError, match="evaluate nll.*formulation='edm'"):
        evaluate.nll(workdir)
    with pytest.raises(UserError, match="to-diffusers.*formulation='edm'"):
        convert.to_diffusers(workdir, str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()
    config.diffusion.formulation = "ddpm"
    config.num_train_steps = 6
    with pytest.raises(UserError, match="diffusion.formulation: checkpoint 'edm', config 'ddpm'"):
        train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("field,value,match", [
    ("sample.sampler", "ddpm", "sample.*ddpm sampler steps between the timesteps.*use one of"),
    ("eval.sampler", "ddim", "eval.*ddim sampler"),
    ("sample.spacing", "trailing", "^sample.*: the trailing spacing picks timesteps.*use logsnr or karras"),
    ("diffusion.loss", "l1", "EDM's weighted MSE; diffusion.loss='l1'"),
    ("diffusion.variance", "learned_range", "learned_range"),
    ("diffusion.sigma_min", 100.0, "0 < sigma_min < sigma_max"),
    ("sample.guidance_interval", (0, 10), "guidance_interval is in timesteps"),
])
def test_an_edm_config_that_cannot_work_is_refused_before_any_work(tmp_path, field, value,
                                                                    match):
    from ddpm_jax.train import config_checks

    config = edm_config()
    config.eval_every_steps = 10  # so the eval section is checked
    config.eval.num_samples = 4
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(config_checks.ConfigError, match=match):
        config_checks.validate(config)
    assert not any(tmp_path.iterdir())


def test_heun_snapshots_show_x_as_a_variance_preserving_x_t_and_end_with_the_samples():
    schedule = diffusion.make_schedule("linear", T)
    network = diffusion.optimal_gaussian_eps(schedule, MEAN, STD)
    x, snapshots = jax.jit(lambda r: samplers.sample(
        network, schedule, SHAPE, r, sampler="heun", num_steps=9, num_snapshots=3,
        clip_x0=False))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(snapshots[-1], x)
    # The first snapshot (after the first call, x at sigma ~ 50) scaled to x_t has about
    # unit std, not sigma's.
    assert 0.8 < float(np.std(snapshots[0])) < 1.2


def test_heun_settings_describe_themselves_in_strict_json():
    import json

    described = SamplerSettings("heun", 35).describe()
    assert described["s_tmax"] == "inf" and described["rho"] == 7.0
    assert json.loads(json.dumps(described, allow_nan=False))["num_steps"] == 35
