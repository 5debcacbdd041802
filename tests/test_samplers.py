"""Samplers on Gaussian data, whose exact epsilon predictor and probability-flow map are known.

Data x0 ~ N(mu, s^2) per dimension. With x_t = a x0 + b eps (a = sqrt(abar), b = sqrt(1 - abar)),
x_t and eps are jointly Gaussian with Cov(eps, x_t) = b and Var(x_t) = a^2 s^2 + b^2, so
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2) (checked by regression below). In z = x / a and
sigma = b / a this is eps = sigma (z - mu) / (s^2 + sigma^2); the ODE dz/dsigma = eps then keeps
(z - mu) / sqrt(s^2 + sigma^2) constant. Every sampler here starts at sigma_max = sigma(t_0) and
ends with a first-order jump from sigma_min = sigma(t_{N-1}) to 0, which returns E[x0 | z]; the
ideal such sampler maps z_T to mu + s^2 (z_T - mu) / sqrt((s^2 + sigma_min^2)(s^2 + sigma_max^2)),
the per-sample reference of the deterministic samplers.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as sl

SCHED = sl.NoiseSchedule(beta_end=0.02)  # the paper's >= 512 setting: sqrt(abar_T) = 0.016
MU = np.linspace(-0.7, 0.7, 8)
S = np.linspace(0.5, 1.0, 8)


def gaussian_eps(schedule, mu, s):
  mu, s = jnp.asarray(mu, jnp.float32), jnp.asarray(s, jnp.float32)

  def eps_fn(x_t, t):
    abar = schedule.alpha_bar_at(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)
  return eps_fn


@functools.lru_cache(maxsize=None)
def _compiled(name, steps, n, schedule, spacing, eta):
  return jax.jit(lambda k: samplers.sample(gaussian_eps(schedule, MU, S), (n, 8), k, sampler=name,
                                           steps=steps, schedule=schedule, spacing=spacing,
                                           eta=eta)[0])


def run(name, steps, n, key=0, schedule=SCHED, spacing=None, eta=None):
  """Samples of the Gaussian (one compilation per configuration), float64 numpy."""
  fn = _compiled(name, steps, n, schedule, spacing, eta)
  return np.asarray(fn(jax.random.key(key)), np.float64)


def ideal(name, steps, n, key=0, schedule=SCHED, spacing=None):
  """The per-sample reference (module docstring) for the same initial noise."""
  x_T = np.asarray(samplers.initial_noise(jax.random.key(key), (n, 8))[0], np.float64)
  plan = samplers.make_plan(schedule, steps, spacing or samplers.get_sampler(name).default_spacing)
  hi, lo = plan.sigma[0], plan.sigma[-2]
  z_T = x_T * np.sqrt(1 + hi**2)
  return MU + S**2 * (z_T - MU) / np.sqrt((S**2 + lo**2) * (S**2 + hi**2))


def ddim_moments(steps, eta):
  """Exact mean/variance of DDIM(eta) on the Gaussian: every update is affine, x_T ~ N(0, 1)."""
  plan = samplers.make_plan(SCHED, steps, "linspace")
  m, v = np.zeros(8), np.ones(8)
  for ab, ab_s in zip(plan.abar[:-1], plan.abar[1:]):
    a, b, a_s = np.sqrt(ab), np.sqrt(1 - ab), np.sqrt(ab_s)
    var = eta**2 * (1 - ab_s) / (1 - ab) * (1 - ab / ab_s)
    k = b / (ab * S**2 + 1 - ab)  # eps = k (x - a mu)
    # x_s = a_s (x - b eps) / a + sqrt(1 - ab_s - var) eps + sqrt(var) z
    c_eps = np.sqrt(1 - ab_s - var) - a_s * b / a
    gain = a_s / a + c_eps * k
    m, v = gain * m - c_eps * k * a * MU, gain**2 * v + var
  return m, v


def test_exact_eps_formula_at_fractional_t():
  n = 200000
  k0, k1 = jax.random.split(jax.random.key(5))
  x0 = MU + S * np.asarray(jax.random.normal(k0, (n, 8)), np.float64)
  eps = np.asarray(jax.random.normal(k1, (n, 8)), np.float64)
  for t in (37.25, 611.7):
    abar = float(SCHED.alpha_bar_at(t, np))
    assert SCHED.alphas_cumprod[int(t) + 1] < abar < SCHED.alphas_cumprod[int(t)]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    pred = np.asarray(gaussian_eps(SCHED, MU, S)(jnp.asarray(x_t, jnp.float32),
                                                 jnp.full((n,), t, jnp.float32)), np.float64)
    resid = eps - pred  # E[resid | x_t] = 0: zero mean and uncorrelated with x_t.
    assert np.abs(resid.mean(0)).max() < 0.01
    corr = ((resid - resid.mean(0)) * (x_t - x_t.mean(0))).mean(0) / (resid.std(0) * x_t.std(0))
    assert np.abs(corr).max() < 0.01
    slope = np.sqrt(1 - abar) / (abar * S**2 + 1 - abar)  # vs the least-squares slope
    np.testing.assert_allclose(((eps - eps.mean(0)) * (x_t - x_t.mean(0))).mean(0) / x_t.var(0),
                               slope, rtol=0.03)


# name, steps, kwargs; tolerances vs the ideal map: per-sample max error, mean, relative variance
DETERMINISTIC = [
    ("ddim", 50, {}, 0.2, 0.005, 0.15),
    ("euler", 100, {}, 0.1, 0.003, 0.08),
    ("heun", 30, {}, 0.025, 0.001, 0.025),
    ("dpmpp_2m", 25, {}, 0.1, 0.002, 0.06),
]
N = 16384


@pytest.mark.parametrize("name,steps,kw,tol_sample,tol_mean,tol_var", DETERMINISTIC,
                         ids=[c[0] for c in DETERMINISTIC])
def test_deterministic_sampler_closed_form(name, steps, kw, tol_sample, tol_mean, tol_var):
  x, ref = run(name, steps, N, **kw), ideal(name, steps, N)
  err = np.abs(x - ref)
  d_mean = np.abs(x.mean(0) - ref.mean(0)).max()
  d_var = np.abs(x.var(0) / ref.var(0) - 1).max()
  print(f"{name} {steps}: max |x - ideal| {err.max():.4f}, rms {np.sqrt((err**2).mean()):.5f}; vs "
        f"ideal: mean {d_mean:.5f}, var rel {d_var:.4f}; vs data: mean "
        f"{np.abs(x.mean(0) - MU).max():.4f}, var rel {np.abs(x.var(0) / S**2 - 1).max():.4f}")
  assert err.max() < tol_sample
  assert d_mean < tol_mean and d_var < tol_var  # discretisation only (same initial noise)
  # Against the data: sampling noise, the N(0, 1) prior (x_T keeps sqrt(abar_T) mu = 0.016 mu)
  # and the final E[x0 | x_t] step (variance factor s^2 / (s^2 + sigma_min^2) > 0.996).
  se_mean, se_var = S / np.sqrt(N), np.sqrt(2 / N)
  assert np.all(np.abs(x.mean(0) - MU) < 4.5 * se_mean + 0.02 * np.abs(MU) + tol_mean)
  assert np.all(np.abs(x.var(0) / S**2 - 1) < 4.5 * se_var + 0.004 + tol_var)


@pytest.mark.parametrize("name,eta,steps", [("ddpm", 1.0, 250), ("ddim", 0.5, 100)])
def test_stochastic_sampler_closed_form(name, eta, steps):
  kw = {} if name == "ddpm" else {"eta": eta}
  x = run(name, steps, N, **kw)
  m, v = ddim_moments(steps, eta)
  print(f"{name} {steps} eta={eta}: mean err {np.abs(x.mean(0) - MU).max():.4f}, var rel err "
        f"{np.abs(x.var(0) / S**2 - 1).max():.4f} (theory {np.abs(v / S**2 - 1).max():.4f})")
  # The sample moments are those the discrete chain must produce ...
  assert np.all(np.abs(x.mean(0) - m) < 4.5 * np.sqrt(v / N))
  assert np.all(np.abs(x.var(0) / v - 1) < 4.5 * np.sqrt(2 / N))
  # ... which are close to the data's (beta~ slightly shrinks the variance at finite steps).
  assert np.all(np.abs(m - MU) < 0.02) and np.all(np.abs(v / S**2 - 1) < 0.08)


def test_ddpm_is_ddim_eta_one_and_euler_is_ddim_eta_zero():
  np.testing.assert_allclose(run("ddpm", 250, N), run("ddim", 250, N, eta=1.0), atol=2e-4)
  np.testing.assert_allclose(run("euler", 50, N), run("ddim", 50, N), atol=2e-4)


@pytest.mark.parametrize("name,steps,min_ratio", [("ddim", 25, 1.7), ("euler", 50, 1.7),
                                                  ("heun", 15, 3.3), ("dpmpp_2m", 20, 3.3)])
def test_convergence_order(name, steps, min_ratio):
  """Doubling the steps divides the error vs the ideal map by ~2 (first order) or ~4 (second)."""
  errs = [np.sqrt(np.mean((run(name, k, N) - ideal(name, k, N)) ** 2)) for k in (steps, 2 * steps)]
  assert errs[0] / errs[1] > min_ratio, errs


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_nfe_matches_counted_calls(name):
  calls = []
  eps_fn = gaussian_eps(SCHED, MU, S)

  def counted(x_t, t):
    jax.debug.callback(lambda n: calls.append(int(n)), x_t.shape[0])
    return eps_fn(x_t, t)

  for steps in ((1, 6) if name in ("heun", "dpmpp_2m") else (6,)):  # 1: edge cases
    calls.clear()
    fn = jax.jit(lambda k: samplers.sample(counted, (4, 8), k, sampler=name, steps=steps,
                                           schedule=SCHED)[0])
    jax.block_until_ready(fn(jax.random.key(0)))
    assert len(calls) == samplers.nfe(name, steps), (steps, len(calls))
  expected_default = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 59, "dpmpp_2m": 25}
  assert samplers.nfe(name) == expected_default[name]


def test_determinism_and_dtype():
  for name in ("ddpm", "heun"):
    a, b, c = (run(name, 10, 64, key=k) for k in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).min() > 0
  x, nfe = jax.jit(lambda k: samplers.sample(gaussian_eps(SCHED, 0.0, 1.0), (2, 4, 4, 3), k,
                                             sampler="dpmpp_2m", steps=5, schedule=SCHED,
                                             dtype=jnp.bfloat16))(jax.random.key(0))
  assert x.dtype == jnp.bfloat16 and x.shape == (2, 4, 4, 3) and int(nfe) == 5


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_clip_denoised_bounds_the_samples(name):
  """Gaussian data spreads beyond [-0.5, 0.5]; clipping every x0 estimate there keeps the
  final sample (the last x0 estimate) inside, and without clipping it is not."""
  eps_fn = gaussian_eps(SCHED, 0.0, 1.0)
  draw = lambda clip: np.asarray(samplers.sample(
      eps_fn, (256, 8), jax.random.key(0), sampler=name, steps=10, schedule=SCHED,
      clip_denoised=clip)[0])
  free, clipped = draw(None), draw(0.5)
  assert np.abs(free).max() > 1.0
  assert np.abs(clipped).max() <= 0.5 + 1e-5
  inside = np.abs(free) < 0.05  # near 0 the clip rarely binds: samples stay close.
  assert np.median(np.abs(free - clipped)[inside]) < 0.1


def test_timestep_spacings_and_errors():
  t = samplers.timesteps(SCHED, 30, "linspace")
  assert t[0] == 999 and t[-1] == 0 and len(t) == 30
  np.testing.assert_array_equal(samplers.timesteps(SCHED, 4, "trailing"), [999, 749, 499, 249])
  np.testing.assert_array_equal(samplers.timesteps(SCHED, 4, "leading"), [750, 500, 250, 0])
  k = samplers.timesteps(SCHED, 10, "karras")
  assert k[0] == pytest.approx(999) and k[-1] == pytest.approx(0, abs=1e-9)
  assert np.all(np.diff(k) < 0)
  with pytest.raises(ValueError, match="ddpm, ddim, euler, heun, dpmpp_2m"):
    samplers.sample(None, (1, 1), jax.random.key(0), sampler="dpm", steps=5, schedule=SCHED)
  with pytest.raises(ValueError, match="valid samplers"):
    samplers.nfe("euler_a", 5)
  with pytest.raises(ValueError, match="linspace"):
    samplers.timesteps(SCHED, 5, "uniform")
  with pytest.raises(ValueError, match="eta"):
    samplers.sample(None, (1, 1), jax.random.key(0), sampler="heun", steps=5, schedule=SCHED,
                    eta=0.5)
  with pytest.raises(ValueError, match="steps"):
    samplers.timesteps(SCHED, 0)


DIFFUSERS_CASES = [("euler", "trailing", 20), ("heun", "trailing", 10),
                   ("dpmpp_2m", "trailing", 20), ("euler", "karras", 12), ("heun", "karras", 8)]


@pytest.mark.parametrize("name,spacing,steps", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in DIFFUSERS_CASES])
def test_matches_diffusers_schedulers(name, spacing, steps):
  """Same algorithm as diffusers' Euler/Heun/DPMSolverMultistep schedulers, same initial noise."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = sl.NoiseSchedule(beta_end=0.012)
  eps_fn = jax.jit(gaussian_eps(sched, MU, S))
  config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon",
                timestep_spacing="trailing" if spacing == "trailing" else "linspace",
                use_karras_sigmas=spacing == "karras")
  cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler,
         "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[name]
  if name == "dpmpp_2m":
    config.update(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
  ref = cls(**config)
  ref.set_timesteps(steps)
  key, shape = jax.random.key(0), (256, 8)
  x_T = np.asarray(samplers.initial_noise(key, shape)[0])
  sigma_max = float(sched.sigma_at(samplers.timesteps(sched, steps, spacing)[0], np))
  x = torch.from_numpy(x_T * (np.sqrt(1 + sigma_max**2) if name != "dpmpp_2m" else 1.0))
  calls = 0
  for t in ref.timesteps:
    inp = ref.scale_model_input(x, t).numpy()
    eps = eps_fn(jnp.asarray(inp), jnp.full((shape[0],), float(t), jnp.float32))
    x = ref.step(torch.from_numpy(np.array(eps)), t, x).prev_sample
    calls += 1
  ours = jax.jit(lambda k: samplers.sample(eps_fn, shape, k, sampler=name, steps=steps,
                                           schedule=sched, spacing=spacing)[0])(key)
  assert samplers.nfe(name, steps) == calls
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=2e-5)
